"""``histoembed export``: a slide run's features and patches in the field's formats, so other tools read them.

* ``trident`` and ``stamp``: one HDF5 file per slide (``inputs/exchange/trident.py``, ``stamp.py``) with the
  features of one view of every patch (view 0, the clean one, unless asked), in the order of the patches'
  ``crop_index``, and their level-0 corners from ``crops.parquet``; the patching (patch size and scale as
  embedded, the slide's size, microns per pixel and objective power) from the crops' settings and the slide.
* ``geojson``: one QuPath GeoJSON per slide: the tissue ``crops`` found (or the slide's mask) as annotations, every
  patch as a detection with its measurements (``tools/export_geojson.py``).

Every file is written under a temporary name and renamed when complete; it carries a content key (an HDF5
attribute, a GeoJSON foreign member) so an export run again rewrites only the slides whose output would change.
Slides only: a flat image's crops have no level-0 scale and no file of these formats to go into.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq

from histoembed.core import feature_store, store
from histoembed.core.config import CropSettings
from histoembed.core.errors import UserError
from histoembed.inputs import slides
from histoembed.inputs.dataset import Sample, load_dataset
from histoembed.inputs.exchange import stamp, trident
from histoembed.inputs.exchange.record import Patching

FORMATS = ("trident", "stamp", "geojson")
EXPORT_VERSION = 1        # part of every file's content key: bump when what a file holds changes meaning
KEY_ATTRIBUTE = "histoembed_key"
CROP_COLUMNS = ["image_id", "split", "label", "crop_index", "x0", "y0", "x1", "y1", "level", "mpp", "source"]


@dataclass
class SlidePatches:
    """One slide of the run: its identity, its file and its patches (sorted by ``crop_index``)."""

    split: str
    image_id: str
    label: str | None
    source: Path
    crop_index: np.ndarray   # [N] int
    boxes: np.ndarray        # [N, 4] int64 level-0 x0, y0, x1, y1
    mpp: float               # microns per pixel the patches were embedded at

    @property
    def key(self) -> str:
        return f"{self.split}/{self.image_id}"

    @property
    def stem(self) -> str:
        return self.source.stem


@dataclass
class ExportResult:
    out: Path
    format: str
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)   # slides (or slide views) not written, with why
    notes: list[str] = field(default_factory=list)      # what the files lack and why (no models, ...)


# ---------------------------------------------------------------- the run's slides

def crop_settings(run: Path) -> tuple[CropSettings, dict]:
    """(the crops stage's settings, the crops file's metadata), defaults for what an older file does not say."""
    meta = store.check_schema(run / store.CROPS_FILE, "crops")
    known = {k: v for k, v in (meta.get("settings") or {}).items() if k in CropSettings.model_fields}
    try:
        return CropSettings(**known), meta
    except ValueError:
        return CropSettings(), meta


def run_slides(run: Path) -> list[SlidePatches]:
    """Every slide of ``run/crops.parquet`` with its patches; a run without slides is a UserError."""
    path = run / store.CROPS_FILE
    if not path.exists():
        raise UserError("crops file not found", path=path, hint="run `histoembed crops` (or `histoembed import`)")
    names = pq.read_schema(path).names
    if "source" not in names:
        raise UserError("the run holds no whole slide: export writes slides' patch features (level-0 "
                        "coordinates), and flat images' crops have none", path=path)
    t = pq.read_table(path, columns=CROP_COLUMNS).to_pandas()
    t = t[t["source"].notna()].sort_values(["split", "image_id", "crop_index"], kind="stable")
    out = []
    for (split, image_id), rows in t.groupby(["split", "image_id"], sort=False):
        out.append(SlidePatches(split, image_id, rows["label"].iloc[0], Path(rows["source"].iloc[0]),
                                rows["crop_index"].to_numpy(np.int64),
                                rows[["x0", "y0", "x1", "y1"]].to_numpy(np.int64), float(rows["mpp"].iloc[0])))
    if not out:
        raise UserError("the run holds no whole slide, only flat images (which have no level-0 coordinates)",
                        path=path)
    _refuse_shared_stems(out, path)
    return out


def flat_images(run: Path) -> list[str]:
    """A note on the run's flat images, which no export writes (their crops have no level-0 coordinates)."""
    t = pq.read_table(run / store.CROPS_FILE, columns=["split", "image_id", "source"])
    flat = {(s, i) for s, i, src in zip(*(t[c].to_pylist() for c in ("split", "image_id", "source"))) if src is None}
    return [f"{len(flat)} flat image(s) left out: their crops have no level-0 coordinates"] if flat else []


def _refuse_shared_stems(slides_: list[SlidePatches], path: Path) -> None:
    """The formats name a slide's file by its stem: two slides of one stem would overwrite each other."""
    seen: dict[str, SlidePatches] = {}
    for s in slides_:
        other = seen.setdefault(s.stem, s)
        if other is not s:
            raise UserError(f"two slides share the file stem {s.stem!r} ({other.source} and {s.source}): the "
                            "exported files are named by stem, so one would overwrite the other", path=path,
                            hint="rename one of the slides (and run `histoembed crops` again)")


def slide_patching(s: SlidePatches, settings: CropSettings, meta: dict) -> Patching:
    """How the slide's patches were cut, from the crops' settings and the slide itself (unchanged since)."""
    recorded = (meta.get("content_stamps") or {}).get(str(s.source.resolve()))
    if recorded is not None and store.ContentStamps({str(s.source.resolve()): recorded})(s.source) != recorded[2]:
        raise UserError("slide changed since `histoembed crops` cut its patches", path=s.source,
                        hint="run `histoembed crops` and `histoembed embed` again, then export")
    with slides.open_slide(s.source) as slide:
        mpp0 = slides.base_mpp(slide, s.source, meta.get("slide_mpp"), bool(meta.get("force_slide_mpp")))
        power = slide.properties.get("openslide.objective-power")
        size0 = tuple(int(v) for v in slide.dimensions)
    try:
        objective = float(power) if power else None
    except ValueError:
        objective = None
    return Patching(s.stem, int(settings.size), float(s.mpp), float(mpp0), size0,
                    overlap=int(round(settings.overlap * settings.size)), objective_power=objective)


def content_key(fmt: str, *parts) -> str:
    """The key a file carries: what it was written from (a re-run with the same key leaves the file alone)."""
    digests = [[str(p.dtype), list(p.shape), hashlib.sha256(np.ascontiguousarray(p).tobytes()).hexdigest()]
               if isinstance(p, np.ndarray) else p for p in parts]
    return store.config_key("export", EXPORT_VERSION, fmt, *digests)


# ---------------------------------------------------------------- feature files

def _h5_key(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get(KEY_ATTRIBUTE)
    except OSError:
        return None
    return value.decode() if isinstance(value, bytes) else (str(value) if value is not None else None)


def _view_rows(features: feature_store.Features, view: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``split/image_id`` -> (crop_index, embedding rows) of one view (the store reads sorted by crop)."""
    sub = features.subset(features.view == view)
    keys = sub.keys()
    if not len(keys):
        return {}
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    return {keys[a]: (sub.crop_index[a:b].astype(np.int64), sub.embedding[a:b]) for a, b in zip(starts, ends)}


def export_features(run: Path, fmt: str, out: Path, views: list[int] | None, encoder: str | None) -> ExportResult:
    """TRIDENT or STAMP files of every slide; ``views`` None: every view the store holds, each in
    ``OUT/view-<v>/`` (else the one view given, straight under ``out``)."""
    settings, meta = crop_settings(run)
    slide_list = run_slides(run)
    store_dir = feature_store.find_feature_store(run, encoder)
    features = feature_store.read_features(store_dir)
    for split in ("train", "test"):
        feature_store.check_complete(features, run, split)
    name = str(features.meta.get("encoder") or store_dir.name)
    stored = sorted(int(v) for v in np.unique(features.view))
    if views is not None and not set(views) <= set(stored):
        raise UserError(f"the store holds views {', '.join(map(str, stored))}, not view {views[0]}", path=store_dir,
                        hint="view 0 is the clean crop; others are augmented copies (`histoembed embed --repeats`)")
    result = ExportResult(out, fmt, notes=flat_images(run))
    patchings = {s.key: slide_patching(s, settings, meta) for s in slide_list}
    writer, where = (trident.write_trident, trident.feature_path) if fmt == "trident" else \
        (stamp.write_stamp, stamp.feature_path)
    for view in views if views is not None else stored:
        root = out if views is not None else out / f"view-{view}"
        rows = _view_rows(features, view)
        for s in slide_list:
            if s.key not in rows:
                result.left_out.append(f"{s.key}: no view {view} in the store (test slides have view 0 only "
                                       "unless embedded with --tta)")
                continue
            crop_index, emb = rows[s.key]
            if not np.array_equal(crop_index, s.crop_index):
                raise UserError(f"the features of {s.key} (view {view}) are not those of its patches in "
                                f"{store.CROPS_FILE}", path=store_dir, hint="run `histoembed embed` again")
            p = patchings[s.key]
            path = where(root, p, name)
            key = content_key(fmt, asdict(p), name, s.boxes, emb)
            if path.exists() and _h5_key(path) == key:
                result.unchanged.append(path)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            writer(path, emb, s.boxes, p, name, extra={KEY_ATTRIBUTE: key})
            result.written.append(path)
    return result


# ---------------------------------------------------------------- entry point

def run_samples(meta: dict, slide_list: list[SlidePatches]) -> tuple[dict[str, Sample], str | None]:
    """({split/image_id: sample}, a note when the data is not known): the samples give the slides' masks."""
    data = meta.get("data")
    if data and Path(data).exists():
        try:
            ds = load_dataset(Path(data))
            return {f"{s.split}/{s.image_id}": s for s in ds.samples}, None
        except UserError as e:
            note = f"the data the crops were cut from cannot be read ({e.problem})"
    else:
        note = "the data the crops were cut from is not known or gone"
    return ({s.key: Sample(s.image_id, s.split, s.source, None, s.label, slide=True) for s in slide_list},
            note + ": tissue is found on the slides again, without their masks")


def run_export(run: Path, fmt: str, out: Path, view: int | None = 0, encoder: str | None = None) -> ExportResult:
    """Export ``run``'s slides as TRIDENT or STAMP files into ``out`` (GeoJSON: ``tools/export_geojson.py``).
    ``view``: the view of the features written (None: every view the store holds, one folder each)."""
    run, out = Path(run), Path(out)
    if fmt not in ("trident", "stamp"):
        raise UserError(f"unknown feature file format {fmt!r}", hint="choose trident or stamp")
    if out.exists():
        store.remove_stale(out, "**/.*.tmp-*")
    return export_features(run, fmt, out, None if view is None else [int(view)], encoder)


def describe(result: ExportResult) -> list[str]:
    """What an export did, line by line (the CLI prints these)."""
    lines = [f"{len(result.written)} {result.format} file(s) written, {len(result.unchanged)} unchanged, "
             f"under {result.out}"]
    lines += [f"note: {n}" for n in result.notes]
    if result.left_out:
        lines.append(f"left out {len(result.left_out)}:")
        lines += [f"  {why}" for why in result.left_out]
    return lines


def json_key(path: Path) -> str | None:
    """The content key a GeoJSON we wrote carries (None for any other file)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (doc.get("histoembed") or {}).get("key") if isinstance(doc, dict) else None
