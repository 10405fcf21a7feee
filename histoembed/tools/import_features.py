"""``histoembed import``: a folder of TRIDENT, CLAM or STAMP feature files as a run's patches and features, so
``fit``, ``submit``, ``report`` and ``compare`` work on them as after ``crops`` and ``embed``.

The files are matched to the manifest's slides by the slide file's stem (TRIDENT and STAMP name each file after
its slide); a slide without a file and a file without a slide are listed. Each slide is opened for its microns
per pixel (STAMP's micrometres need it) and its pyramid (the level a patch would be read at). The run gets

* ``crops.parquet``: one row per patch in the file's order (crop ``i`` is feature row ``i``), with the metadata
  ``crops`` writes (the data's stamps, so later stages notice changed slides; a ``CropSettings`` whose size and
  scale are the files'), and
* a feature store ``features/<encoder>/`` holding view 0 of every patch (``repeats`` 1, no test-time views), each
  row keyed by its patch's digest, built from the slide's and the file's contents: a changed file, like a
  changed slide, makes its features stale.

Importing again with the same files, slides and options does nothing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from histoembed import __version__
from histoembed.core import feature_store, store
from histoembed.core.config import CropSettings
from histoembed.core.errors import UserError
from histoembed.inputs import slides
from histoembed.inputs.dataset import Sample, load_dataset
from histoembed.inputs.exchange.folder import check_one_cohort, feature_files, read_feature_file
from histoembed.inputs.exchange.record import FeatureFile
from histoembed.inputs.exchange.rows import embedded_mpp, patch_level, slide_rows
from histoembed.inputs.provenance import sample_stamps

IMPORT_VERSION = 1
IMPORT_STAMPS = "import_stamps"   # crops metadata: the feature files' content stamps (cache for the next import)
PART_ROWS = 200_000               # feature rows per store part


@dataclass
class SlideFile:
    """A manifest slide and its feature file, with what its slide says."""

    sample: Sample
    path: Path
    level0_mpp: float
    downsamples: tuple[float, ...]
    record: FeatureFile | None = None


@dataclass
class ImportResult:
    run: Path
    encoder: str
    store_dir: Path
    slides: int
    patches: int
    no_file: list[str] = field(default_factory=list)    # manifest slides without a feature file
    no_slide: list[str] = field(default_factory=list)   # feature files without a manifest slide
    skipped: bool = False


def match_files(folder: Path, samples: list[Sample], data: Path) -> tuple[list[tuple[Sample, Path]], list, list]:
    """(slide and file pairs, slides without a file, files without a slide), by the slide file's stem."""
    files = {p.stem: p for p in feature_files(folder)}
    by_stem: dict[str, Sample] = {}
    for s in samples:
        other = by_stem.setdefault(s.image.stem, s)
        if other is not s:
            raise UserError(f"two slides share the file stem {s.image.stem!r} ({other.image} and {s.image}): "
                            "feature files are named by stem, so which file is whose cannot be told", path=data,
                            hint="rename one of the slides (and its feature file)")
    pairs = [(s, files[stem]) for stem, s in by_stem.items() if stem in files]
    no_file = [f"{s.image} ({s.split})" for stem, s in by_stem.items() if stem not in files]
    no_slide = [str(p) for stem, p in files.items() if stem not in by_stem]
    return pairs, no_file, no_slide


def slide_files(folder: Path, data: Path, slide_mpp: float | None) -> tuple[list[SlideFile], list[str], list[str],
                                                                            object]:
    """(each matched slide with its file and scale, slides without a file, files without a slide, the dataset)."""
    ds = load_dataset(data)
    flat = [s for s in ds.samples if not s.slide]
    if flat:
        raise UserError(f"{len(flat)} image(s) of the manifest are not whole slides (e.g. {flat[0].image}): "
                        "feature files hold slides' patches", path=data,
                        hint="import into a run of slides only; cut flat images with `histoembed crops`")
    pairs, no_file, no_slide = match_files(folder, ds.samples, data)
    if not pairs:
        raise UserError(f"no feature file is named after a slide of {data.name} (files are matched by the slide "
                        f"file's stem: slide_01.svs -> slide_01.h5)", path=folder,
                        hint=f"e.g. slides {', '.join(no_file[:3])}; files {', '.join(no_slide[:3])}")
    out = []
    for s, path in pairs:
        with slides.open_slide(s.image) as slide:
            out.append(SlideFile(s, path, slides.base_mpp(slide, s.image, slide_mpp),
                                 tuple(float(d) for d in slide.level_downsamples)))
    return out, no_file, no_slide, ds


def read_records(files: list[SlideFile], folder: Path, encoder: str | None, patch_size: int | None) -> tuple[str, int]:
    """Read every file's patching (not its features), check them as one cohort; (encoder name, patch size)."""
    for f in files:
        f.record = read_feature_file(f.path, encoder, f.level0_mpp, with_features=False)
    records = [f.record for f in files]
    check_one_cohort(records, folder)
    name = encoder or records[0].encoder_in_file
    if not name:
        raise UserError("the feature files do not name their encoder (no 'encoder' or 'extractor' attribute, no "
                        "features_<encoder> folder)", path=folder, hint="name it: --encoder NAME (e.g. uni_v2)")
    size = patch_size or records[0].patch_size
    if not size:
        raise UserError("the feature files do not say the patches' size in pixels", path=folder,
                        hint="give it: --patch-size PX (the pixels each patch was embedded at, e.g. 224)")
    return name, int(size)


def _store_meta(key: str, encoder: str, dim: int, size: int, crops_key: str, kind: str) -> dict:
    """What ``feature_store.store_meta`` records for an embed, for features another tool embedded: one view
    (``repeats`` 1, no test-time views, so completeness checks expect view 0 alone), no weights of ours."""
    return {"key": key, "encoder": encoder, "encoder_id": encoder, "weights_hash": None, "dim": dim,
            "pool": f"imported from {kind}", "size": size, "precision": None, "repeats": 1, "tta": False, "seed": 0,
            "augment": None, "store_dtype": "float32", "crops_key": crops_key, "shard": "0/1",
            "package_version": __version__, "precision_check": None, "stain": None}


def write_store(store_dir: Path, files: list[SlideFile], digests: list[str], meta_of, encoder: str) -> int:
    """The feature store of ``files`` (view 0 of every patch, keyed by its digest: ``digests`` in the files'
    order) into ``store_dir``, built under a temporary name and renamed over the old store when whole;
    ``meta_of(dim)`` gives the parts' metadata. Returns the rows written."""
    tmp = store_dir.parent / f".{store_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    batch: list[tuple[Sample, np.ndarray]] = []
    start = written = part = 0

    def flush() -> None:
        nonlocal part, written
        if not batch:
            return
        emb = np.concatenate([f for _, f in batch])
        n = len(emb)
        schema = feature_store.part_schema(emb.shape[1], "float32", meta_of(emb.shape[1]))
        table = feature_store.part_rows([s.image_id for s, f in batch for _ in range(len(f))],
                                        [s.split for s, f in batch for _ in range(len(f))],
                                        np.concatenate([np.arange(len(f)) for _, f in batch]).tolist(), [0],
                                        emb[:, None, :], schema, digests[written:written + n])
        feature_store.write_part(table, tmp / f"part-import-{part:05d}.parquet")
        part, written = part + 1, written + n
        batch.clear()

    for f in files:
        features = read_feature_file(f.path, encoder, f.level0_mpp).features
        if len(features) != len(f.record):
            raise UserError("the file changed while it was read", path=f.path, hint="import again")
        batch.append((f.sample, features))
        start += len(features)
        if start - written >= PART_ROWS:
            flush()
    flush()
    old = store_dir.parent / f".{store_dir.name}.old-{os.getpid()}"
    if store_dir.exists():
        store_dir.rename(old)
    tmp.rename(store_dir)
    shutil.rmtree(old, ignore_errors=True)
    return written


def _refuse_foreign_crops(out: Path) -> dict:
    """The metadata of a crops file an earlier import wrote ({} when none); one ``crops`` cut is not overwritten."""
    if not out.exists():
        return {}
    meta = store.read_meta(out)
    if "imported" not in meta:
        raise UserError("the run already holds crops cut by `histoembed crops`: importing would replace them and "
                        "leave its features and models describing other patches", path=out,
                        hint="import into a new run folder (--run)")
    return meta


def crops_table(files: list[SlideFile], size: int, stamp: store.ContentStamps, file_stamp: store.ContentStamps,
                groups: bool) -> pa.Table:
    """Every matched slide's patches as rows of ``crops.parquet``, slide by slide in the manifest's order."""
    tables = []
    for f in files:
        r = f.record
        level = patch_level(f.downsamples, r.patch_size_level0, size)
        both = store.config_key("imported", stamp(f.sample.image), file_stamp(f.path))
        tables.append(slide_rows(r, f.sample, level=level, level0_mpp=f.level0_mpp, stamp=both, size=size,
                                 groups=groups))
    return pa.concat_tables(tables)


def run_import(folder: Path, data: Path, run: Path, encoder: str | None = None, patch_size: int | None = None,
               slide_mpp: float | None = None, verify_data: bool = False) -> ImportResult:
    """Import ``folder``'s feature files for the slides of ``data`` into ``run`` (see the module docstring)."""
    folder, data, run = Path(folder), Path(data), Path(run)
    out = run / store.CROPS_FILE
    old = _refuse_foreign_crops(out)
    files, no_file, no_slide, ds = slide_files(folder, data, slide_mpp)
    name, size = read_records(files, folder, encoder, patch_size)
    stamp = store.ContentStamps(None if verify_data else old.get("content_stamps"))
    file_stamp = store.ContentStamps(None if verify_data else old.get(IMPORT_STAMPS))
    stamps = sample_stamps(ds, stamp)
    has_groups = any(s.group for s in ds.samples)
    r0 = files[0].record
    settings = CropSettings(size=size, mpp=round(embedded_mpp(r0, files[0].level0_mpp, size), 6),
                            overlap=min(0.99, r0.overlap / size), max_patches=0, min_tissue=0.0)
    key = store.stage_key("import", IMPORT_VERSION, settings, stamps, name, slide_mpp,
                          [[f.sample.split, f.sample.image_id, f.path.name, file_stamp(f.path)] for f in files])
    store_dir = run / store.FEATURES_DIR / feature_store.encoder_slug(name)
    store_key = store.config_key("imported-features", key)
    result = ImportResult(run, name, store_dir, len(files), 0, no_file, no_slide)
    parts = feature_store.feature_parts(store_dir)
    if old.get("key") == key and old.get("schema") == store.SCHEMA and parts and \
            {store.read_meta(p).get("key") for p in parts} == {store_key}:
        result.patches, result.skipped = int(old.get("patches", 0)), True
        return result
    table = crops_table(files, size, stamp, file_stamp, has_groups)
    meta = {"key": key, "settings": settings.model_dump(), "data": str(data.resolve()),
            "data_stamp": store.config_key("data", stamps), "qc": None, "images": len(files), "left_out": 0,
            "classes": ds.classes, "content_stamps": stamp.used, "slides": len(files), "slide_mpp": slide_mpp, "force_slide_mpp": False,
            "imported": {"folder": str(folder.resolve()), "kind": r0.kind, "encoder": name,
                         "no_file": no_file, "no_slide": no_slide},
            IMPORT_STAMPS: file_stamp.used, "patches": len(table)}
    run.mkdir(parents=True, exist_ok=True)
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    store.remove_stale(store_dir.parent, ".*.tmp-*")
    out.unlink(missing_ok=True)   # the store and crops of two imports never pair up: crops go in last
    result.patches = write_store(store_dir, files, table["patch_digest"].to_pylist(),
                                 lambda dim: _store_meta(store_key, name, dim, size, key, r0.kind), name)
    store.write_table(table, out, meta=meta)
    return result
