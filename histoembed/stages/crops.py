"""``histoembed crops``: cut every image's crops and lay every slide's patch grid, writing ``run/crops.parquet``.

The recipe itself (strategies, mask modes, scales, crop identity) is ``inputs/cropping.py``; this module runs it
over a dataset in worker processes (or on Ray), skips what is unchanged, and records the data it read
(``inputs/provenance.py``) so that later stages can tell when it changed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histoembed import engines
from histoembed.core import cpus, store
from histoembed.core.config import CropSettings, QCSettings
from histoembed.core.console import noun, progress
from histoembed.core.errors import UserError
from histoembed.inputs import artifacts, slides
from histoembed.inputs.samples import check_keep
from histoembed.inputs.dataset import (
    MAX_PIXELS,
    Dataset,
    Problem,
    Sample,
    load_dataset,
    read_image_and_mask,
)
from histoembed.inputs.cropping import crop_image, patch_digest, score_patches, slide_patches, slide_tissue
from histoembed.inputs.pixels import repair_ink
from histoembed.inputs.provenance import CROPS_SUMMARY_KEY, changed_since, crops_summary, sample_stamps

CROPS_VERSION = 3                 # bump when the crops' definition changes (part of the skip key)
SUMMARY_KEY = CROPS_SUMMARY_KEY  # footer metadata: what the run skipped and why


# ---------------------------------------------------------------- one image in a worker

@dataclass
class _CropJob:
    sample: Sample
    settings: CropSettings
    repair: dict | None  # QC settings to repair ink with, or None
    slide_mpp: float | None = None  # a slide's microns per pixel when its file does not state a plausible one
    stamp: str | None = None        # a slide's content stamp (part of each patch's digest)
    force_mpp: bool = False         # slide_mpp for every slide, over its own


@dataclass
class _CroppedImage:
    key: tuple[str, str]  # (split, image_id)
    rows: list[tuple] = field(default_factory=list)  # (crop_index, x0, y0, x1, y1, fraction, strategy, scale, png)
    fallback: str | None = None
    problem: Problem | None = None
    repaired: bool = False
    flags: list[list[str]] | None = None   # a scored slide's patch flags
    ink: dict[str, float] = field(default_factory=dict)  # a slide's pen ink on its thumbnail, share by colour


def _encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _crop_slide(job: _CropJob) -> _CroppedImage:
    """A slide's patch grid over its tissue (pen ink and the border kept out), each patch read and scored for
    artifacts (``settings.score_patches``)."""
    sample, settings = job.sample, job.settings
    try:
        tissue = slide_tissue(sample, settings, job.slide_mpp, job.force_mpp)
        boxes, geo, _ = slide_patches(sample, settings, job.slide_mpp, job.force_mpp, tissue=tissue)
        if settings.score_patches:
            scores, flags = score_patches(slides.process_handles().get(sample.image), Path(sample.image), boxes,
                                          geo, settings, tissue.fold_cut)
        else:
            scores, flags = {k: [None] * len(boxes) for k in artifacts.SCORE_COLUMNS}, [None] * len(boxes)
    except UserError as e:
        return _CroppedImage(sample.key, problem=Problem(e.path or sample.image, f"{e.problem}; slide skipped"))
    finally:   # crops reads each slide once: no handle (and its tile cache) outlives its job
        slides.process_handles().drop(sample.image)
    source = str(Path(sample.image).resolve())
    score_rows = list(zip(*(scores[k] for k in artifacts.SCORE_COLUMNS)))
    rows = [(i, *b, f, "slide-grid", 1.0, None, geo.level, settings.mpp, source,
             patch_digest(job.stamp, geo.level, b, settings.size, settings.mpp), flags[i],
             *(None if v is None or not np.isfinite(v) else float(v) for v in score_rows[i]))
            for i, (b, f) in enumerate(boxes)]
    ink = tissue.marks.ink_fractions() if tissue.marks is not None else {}
    return _CroppedImage(sample.key, rows, flags=None if not settings.score_patches else flags,
                         ink={k: v for k, v in ink.items() if v > 0})


def _crop_one(job: _CropJob) -> _CroppedImage:
    sample = job.sample
    if sample.slide:
        return _crop_slide(job)
    try:
        rgb, mask = read_image_and_mask(sample.image, sample.mask, max_pixels=None)  # checked by load_dataset
    except UserError as e:
        return _CroppedImage(sample.key,
                             problem=Problem(e.path or sample.image, f"{e.problem}; image skipped"))
    repaired = False
    if job.repair is not None:
        base = mask if mask is not None else np.full(rgb.shape[:2], 255, np.uint8)
        rgb, fixed = repair_ink(rgb, base, QCSettings.model_validate(job.repair))
        mask = fixed if mask is not None else None
        repaired = True
    crops, fallback = crop_image(rgb, mask, job.settings)
    rows = [(i, *c.box, c.tissue_fraction, c.strategy, c.scale, _encode_png(c.pixels)) for i, c in enumerate(crops)]
    return _CroppedImage(sample.key, rows, fallback, repaired=repaired)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process; OpenCV's own threads would oversubscribe


@contextlib.contextmanager
def cropped_images(jobs: list[_CropJob], settings: CropSettings) -> Iterator[Iterator[_CroppedImage]]:
    """Every job's ``_crop_one`` result, in the jobs' order, by the engine ``settings`` name.

    local: worker processes of this machine (or this process); ray: one Ray task per image
    over a cluster. Either way each image goes through the same ``_crop_one``.
    """
    engine = engines.pick(settings.engine)
    with engine.session(settings.ray_address), \
            engine.map_ordered(_crop_one, jobs, n_workers(settings.workers), _init_worker) as results:
        yield results


# ---------------------------------------------------------------- the stage

@dataclass
class CropsResult:
    path: Path
    images: int                       # images that got crops
    crops: int
    per_image: tuple[int, float, int]  # crops per image: min, median, max
    fallbacks: list[tuple[str, str, str]]  # (split, image_id, why) for images cut by grid-fallback
    problems: list[Problem]           # items skipped, with why (data checks and unreadable files)
    left_out: list[str]               # training images (names) left out because QC flagged them
    repaired: list[tuple[str, str]]   # (split, image_id) of images whose ink was repaired before cropping
    skipped: bool                     # True: inputs and settings unchanged, nothing was done
    warnings: list[str] = field(default_factory=list)  # e.g. a patient in both splits (leakage)
    slide_keys: frozenset[str] = frozenset()  # split/image_id of every whole slide in the data (left out or not)
    slides: int = 0                   # of ``images``, how many are whole slides
    patches: int = 0                  # of ``crops``, how many are patches of a slide
    artifacts: list[dict] = field(default_factory=list)  # per scored slide: its patches, flags by cause, usable share

    def counted(self, keys: Sequence[str], slide_keys: frozenset[str]) -> CropsResult:
        """Count the slides and their patches among ``keys`` (one ``split/image_id`` per crop written)."""
        self.slide_keys = slide_keys
        self.slides = len(set(keys) & slide_keys)
        self.patches = sum(k in slide_keys for k in keys)
        return self


def _read_qc(run: Path, stamp: store.ContentStamps) -> tuple[dict[tuple[str, str], dict], dict | None, list | None]:
    """({(split, image_id): row}, QC settings as a dict, the file's stamp) of run/qc.parquet, if any."""
    table = store.read_qc(run)
    if table is None:
        return {}, None, None
    path = run / store.QC_FILE
    missing = [c for c in ("image_id", "split", "flagged", "ink") if c not in table.column_names]
    if missing:
        raise UserError(f"QC table lacks column(s) {', '.join(missing)}", path=path, hint="re-run `histoembed qc`")
    rows = {(r["split"], r["image_id"]): r for r in table.select(["image_id", "split", "flagged", "ink"]).to_pylist()}
    meta = store.read_meta(path)
    return rows, meta.get("settings"), [stamp(path), meta.get("key")]


def _summary(path: Path) -> dict:
    return crops_summary(path)


def _counts(keys: Sequence[str]) -> tuple[int, float, int]:
    """Crops per image (min, median, max) from one ``split/image_id`` key per crop."""
    if not len(keys):
        return (0, 0.0, 0)
    _, n = np.unique(np.asarray(keys, dtype=object), return_counts=True)
    return int(n.min()), float(np.median(n)), int(n.max())


def _previous(out: Path, slide_keys: frozenset[str]) -> CropsResult:
    t = pq.read_table(out, columns=["image_id", "split"])
    keys = store.image_keys(t["split"].to_pylist(), t["image_id"].to_pylist())
    sm = _summary(out)
    return CropsResult(out, len(set(keys)), len(keys), _counts(keys), [tuple(f) for f in sm.get("fallbacks", [])],
                       [Problem(Path(p), why) for p, why in sm.get("problems", [])], sm.get("left_out", []),
                       [tuple(r) for r in sm.get("repaired", [])], skipped=True, warnings=sm.get("warnings", []),
                       artifacts=sm.get("artifacts", [])).counted(keys, slide_keys)


def n_workers(requested: int) -> int:
    """0 means every CPU this process may use (affinity and cgroup quota)."""
    return requested if requested > 0 else cpus.usable_cpus()


def _refuse_lost_classes(ds, samples: list[Sample], flagged: set[tuple[str, str]], data: Path) -> None:
    """Stop when a label given in the data has no training image left: a model would silently lack it.

    The stop lists the causes: the problems of that label's items (the data checks tag each with its label),
    or every problem the checks found when none is tagged (nothing else is printed before the stop).
    """
    kept = {s.label for s in samples if s.split == "train"}
    for label in ds.classes:
        if label in kept:
            continue
        n = sum(1 for s in ds.samples if s.label == label and s.key in flagged)
        if n:
            raise UserError(f"label {label!r} has no training image left to crop: QC flagged all {n} of its "
                            "usable image(s)", path=data,
                            hint="pass --include-flagged (or --keep ID for some of them) to keep flagged images")
        causes = [p for p in ds.problems if p.label == label] or list(ds.problems)
        listed = "".join(f"\n  {p}" for p in causes[:20]) + (f"\n  ... and {len(causes) - 20} more"
                                                           if len(causes) > 20 else "")
        raise UserError(f"label {label!r} has no training image left to crop: every image with this label was "
                        f"skipped by the data check{':' if listed else ''}{listed}", path=data,
                        hint="fix the problems listed, then run `histoembed crops` again")


def _refuse_stale_qc(run: Path, stamps: list[list]) -> None:
    """Stop when an image or mask changed since QC checked it: its flags (and ink repairs) would describe
    other pixels, and a paste copied over a clean image would go into training unflagged."""
    path = run / store.QC_FILE
    if not path.exists():
        return
    changed = changed_since(store.read_meta(path), [(sp, i, im, m) for sp, i, _, im, m in stamps])
    if changed:
        raise UserError(f"the data changed since `histoembed qc` checked it: {len(changed)} image(s) differ from "
                        f"the bytes QC flagged or were never checked ({_first(changed)})", path=path,
                        hint="run `histoembed qc`, then `histoembed crops` again")


def check_slide_scales(samples: Sequence[Sample], settings: CropSettings, slide_mpp: float | None,
                       force: bool = False) -> None:
    """Stop before any work when a slide's scale cannot be trusted or the settings misuse it: no plausible microns
    per pixel and no ``--slide-mpp`` (``inputs/slides.stated_mpp``), ``--force-slide-mpp`` without a value, or an
    ``--mpp`` that would enlarge its patches (``slides.geometry``). Opens each slide, reads no pixels."""
    if force and not slide_mpp:
        raise UserError("--force-slide-mpp needs --slide-mpp MPP: the value to put on every slide",
                        hint="add --slide-mpp MPP (e.g. 0.25 at 40x, 0.5 at 20x)")
    for s in samples:
        if s.slide:
            with slides.open_slide(s.image) as slide:
                mpp0 = slides.base_mpp(slide, s.image, slide_mpp, force)
                slides.geometry(slide, mpp0, settings.mpp, settings.size, s.image, settings.allow_upsample)


def _scale_key(slide_mpp: float | None, force: bool) -> float | list | None:
    """What the user said about slides' scale, as the skip key holds it (as before --force-slide-mpp when unset)."""
    return [slide_mpp, "force"] if force else slide_mpp


def _first(names: Sequence[str], n: int = 5) -> str:
    """The first ``n`` names, comma-separated, with `...` when there are more."""
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")



def _leave_out_flagged(ds: Dataset, run: Path, qc_rows: dict, keep: Sequence[str], include_flagged: bool,
                       data: Path) -> tuple[list[str], list[Sample]]:
    """(training images QC flagged and left out, the samples to crop); stops when a label loses every image."""
    left_out = [s.image_id for s in ds.split("train")
                if qc_rows.get(s.key, {}).get("flagged") and not include_flagged and s.image_id not in keep]
    dropped = {("train", name) for name in left_out}
    samples = [s for s in ds.samples if s.key not in dropped]
    if not samples:
        raise UserError("every image was left out (all training images flagged by QC and no test images)",
                        path=run / store.QC_FILE, hint="pass --include-flagged or --keep ID")
    _refuse_lost_classes(ds, samples, dropped, data)
    return left_out, samples


def _jobs(samples: list[Sample], settings: CropSettings, qc_rows: dict, qc_settings: dict | None,
          slide_mpp: float | None, stamps: list[list], force_mpp: bool = False) -> list[_CropJob]:
    """One job per sample; images QC found ink on are repaired first (unless QC's settings turned repair off)."""
    repair_on = qc_settings is None or qc_settings.get("repair_ink", True)
    stamp_of = {(sp, i): im for sp, i, _, im, _ in stamps}
    jobs = []
    for s in samples:
        ink = bool(qc_rows.get(s.key, {}).get("ink"))
        jobs.append(_CropJob(s, settings, (qc_settings or {}) if (ink and repair_on and not s.slide) else None,
                             slide_mpp, stamp_of.get(s.key), force_mpp))
    return jobs


@dataclass
class _Written:
    """The crops as they are written, in batches, and what the summary says about the images they came from."""
    schema: pa.Schema
    samples: list[Sample]
    problems: list[Problem]                                      # the data check's, then the unreadable
    fallbacks: list[tuple[str, str, str]] = field(default_factory=list)
    repaired: list[tuple[str, str]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)             # split/image_id of every crop written
    batch: list[tuple] = field(default_factory=list)
    artifacts: list[dict] = field(default_factory=list)          # per scored slide (CropsResult.artifacts)
    warnings: list[str] = field(default_factory=list)            # slides under --min-usable, kept

    def __post_init__(self) -> None:
        self.path_of = {s.key: s.image for s in self.samples}
        self.label_of = {s.key: s.label for s in self.samples}
        self.group_of = {s.key: s.group for s in self.samples}
        self.has_slides = any(s.slide for s in self.samples)
        self.has_groups = any(s.group for s in self.samples)

    def add(self, done: _CroppedImage) -> None:
        """One image's (or slide's) rows, shaped to the table's columns."""
        split, image_id = done.key
        if done.fallback is not None:
            self.fallbacks.append((split, image_id, done.fallback))
        if done.repaired:
            self.repaired.append(done.key)
        for row in done.rows:
            if self.has_slides and len(row) == 9:  # a flat image's row: no slide columns
                row = (*row, *[None] * len(store.SLIDE_FIELDS))
            elif not self.has_slides:
                row = row[:9]
            if self.has_groups:
                row = (*row, self.group_of[done.key])
            self.batch.append((image_id, split, self.label_of[done.key], *row))
            self.written.append(f"{split}/{image_id}")

    def usable(self, done: _CroppedImage, settings: CropSettings, strict: bool) -> bool:
        """Count a scored slide's flags; False when its usable share is under ``min_usable`` and ``strict``
        leaves it out (named among the problems; without ``strict`` it is kept and named in a warning)."""
        if done.flags is None:
            return True
        split, image_id = done.key
        fractions = artifacts.flag_fractions(done.flags)
        self.artifacts.append({"split": split, "image_id": image_id, "patches": len(done.flags),
                               "flagged": {k: sum(k in f for f in done.flags) for k in artifacts.FLAG_NAMES},
                               "usable": fractions["usable"], "ink_on_thumbnail": done.ink})
        if fractions["usable"] >= settings.min_usable:
            return True
        why = (f"only {fractions['usable']:.0%} of its {len(done.flags)} patches are usable (no artifact flag), "
               f"under --min-usable {settings.min_usable:g}")
        if strict:
            self.problems.append(Problem(self.path_of[done.key], f"{why}; slide left out (--strict)"))
            return False
        self.warnings.append(f"{image_id} ({split}): {why}")
        return True

    def flush(self, writer: pq.ParquetWriter) -> None:
        if self.batch:
            cols = list(zip(*self.batch))
            writer.write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, self.schema)],
                                                    schema=self.schema))
            self.batch.clear()


def _write_crops(out: Path, written: _Written, jobs: list[_CropJob], settings: CropSettings, strict: bool,
                 left_out: list[str], data: Path) -> None:
    """Crop every job (on the engine ``settings`` name) into ``out``, atomically, with the summary in its footer."""
    slides = sum(j.sample.slide for j in jobs)
    unit = noun(len(jobs) - slides, slides, number="s")
    with store.atomic_path(out) as tmp:
        writer = pq.ParquetWriter(tmp, written.schema, compression="zstd")
        try:
            with cropped_images(jobs, settings) as results, progress(unit) as bar:
                bar_id = bar.add_task("crops", total=len(jobs))
                for done in results:
                    bar.advance(bar_id)
                    if done.problem is not None:
                        if strict:
                            raise UserError(f"{done.problem.problem.removesuffix('; image skipped')} "
                                            "(--strict: nothing written)", path=done.problem.path)
                        written.problems.append(done.problem)
                        continue
                    if written.usable(done, settings, strict):
                        written.add(done)
                    if len(written.batch) >= 256:
                        written.flush(writer)
            written.flush(writer)
            if not written.written:
                raise UserError("no image could be cropped", path=data,
                                hint="\n  ".join(map(str, written.problems[:20])) or None)
            writer.add_key_value_metadata({SUMMARY_KEY: json.dumps({
                "fallbacks": written.fallbacks, "problems": [[str(p.path), p.problem] for p in written.problems],
                "left_out": left_out, "repaired": written.repaired, "artifacts": written.artifacts,
                "warnings": written.warnings})})
        finally:
            writer.close()


def run_crops(data: Path, run: Path, settings: CropSettings, strict: bool = False, keep: Sequence[str] = (),
              include_flagged: bool = False, max_pixels: int = MAX_PIXELS, verify_data: bool = False,
              slide_mpp: float | None = None, force_slide_mpp: bool = False) -> CropsResult:
    """Cut the crops of both splits into ``run/crops.parquet`` (nothing to do when unchanged).

    ``strict`` stops at the first bad item, before anything is written. With a
    ``run/qc.parquet``, flagged training images are left out (unless ``include_flagged`` or
    named in ``keep``) and images with ink are repaired first; test images are never left out.
    The QC table must have checked the same image and mask bytes. ``verify_data`` hashes every
    file again instead of trusting the stamps cached by size and modification time.

    Whole slides (``Sample.slide``) get patches as coordinates (no pixels): a grid at ``settings.mpp`` over
    the tissue of a thumbnail; ``slide_mpp`` is the microns per pixel of slides whose file does not state a
    plausible one (of every slide with ``force_slide_mpp``).
    """
    data, run = Path(data), Path(run)
    out = run / store.CROPS_FILE
    store.remove_stale(run, ".*.tmp-*")  # what killed runs left
    ds = load_dataset(data, strict=strict, max_pixels=max_pixels)
    check_keep(ds, keep, data)
    stamp = store.ContentStamps(None if verify_data else store.read_meta(out).get("content_stamps"))
    stamps = sample_stamps(ds, stamp)
    _refuse_stale_qc(run, stamps)
    qc_rows, qc_settings, qc_stamp = _read_qc(run, stamp)
    left_out, samples = _leave_out_flagged(ds, run, qc_rows, keep, include_flagged, data)
    check_slide_scales(samples, settings, slide_mpp, force_slide_mpp)

    has_slides, has_groups = any(s.slide for s in samples), any(s.group for s in samples)
    slide_keys = frozenset(f"{s.split}/{s.image_id}" for s in ds.samples if s.slide)
    key = store.stage_key(
        "crops", CROPS_VERSION, settings, sorted(keep), include_flagged, qc_stamp,
        stamps, [str(p) for p in ds.problems], _scale_key(slide_mpp, force_slide_mpp) if has_slides else None,
        [s.group for s in samples] if has_groups else None,
    )
    old = store.read_meta(out) if out.exists() else {}
    if old.get("key") == key and old.get("schema") == store.SCHEMA:  # an older file is cut again
        result = _previous(out, slide_keys)
        result.warnings = ds.warnings + result.warnings
        return result

    meta = {"key": key, "settings": settings.model_dump(), "data": str(data.resolve()),
            "data_stamp": store.config_key("data", stamps), "qc": qc_stamp[1] if qc_stamp else None,
            "images": len(samples), "left_out": len(left_out), "classes": ds.classes, "content_stamps": stamp.used,
            "slides": sum(s.slide for s in samples), "slide_mpp": slide_mpp, "force_slide_mpp": force_slide_mpp}
    written = _Written(store.with_meta(store.crops_schema(has_slides, has_groups), meta), samples,
                       list(ds.problems))
    _write_crops(out, written, _jobs(samples, settings, qc_rows, qc_settings, slide_mpp, stamps, force_slide_mpp),
                 settings,
                 strict, left_out, data)
    w = written.written
    return CropsResult(out, len(set(w)), len(w), _counts(w), written.fallbacks, written.problems,
                       left_out, written.repaired, skipped=False, warnings=ds.warnings + written.warnings,
                       artifacts=written.artifacts).counted(w, slide_keys)
