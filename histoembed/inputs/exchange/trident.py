"""TRIDENT's feature files (mahmoodlab/TRIDENT), and CLAM's older ones, written and read.

One HDF5 file per slide, named by the slide's stem, in ``<mag>x_<patch>px_<overlap>px_overlap/features_<encoder>/``:

* dataset ``features``: (N, D) float32, attributes ``name`` (the slide), ``savetodir`` and, from us, ``encoder``
  (TRIDENT itself names the encoder only in the folder);
* dataset ``coords``: (N, 2) int64 level-0 top-left corners, with the patching as attributes: ``patch_size``
  (pixels at the target magnification), ``patch_size_level0``, ``level0_magnification``,
  ``target_magnification``, ``overlap`` (pixels at the target magnification), ``level0_width``,
  ``level0_height``, ``name``, ``savetodir``; we add ``level0_mpp`` and ``mpp`` (microns per pixel of level 0 and
  of the patches as embedded), which TRIDENT's readers ignore and ours prefer to the 10 / magnification rule.

CLAM (and Fishing-Rod) files put ``patch_size`` at ``patch_level`` (times ``custom_downsample``) on ``coords``;
CLAM's own feature files often carry no attribute at all, and the patch side then comes from the grid's step.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from histoembed.core.errors import UserError
from histoembed.core.feature_store import encoder_slug
from histoembed.inputs.exchange.record import (
    FeatureFile,
    Patching,
    boxes_of,
    check_coords,
    check_feature_shape,
    check_features,
    check_inside,
    dataset,
    number,
    shape,
    square_side,
    text,
    writable_features,
    writing,
)

FEATURES, COORDS = "features", "coords"


def patching_folder(p: Patching) -> str:
    """TRIDENT's folder for a patching: ``20x_256px_0px_overlap``."""
    return f"{p.magnification}x_{p.patch_size}px_{p.overlap}px_overlap"


def feature_path(out: str | Path, p: Patching, encoder: str) -> Path:
    """Where TRIDENT keeps the slide's features: ``OUT/20x_256px_0px_overlap/features_<encoder>/<slide>.h5``."""
    return Path(out) / patching_folder(p) / f"features_{encoder_slug(encoder)}" / f"{p.slide}.h5"


def coords_attributes(p: Patching, side0: int, savetodir: str) -> dict:
    """The attributes TRIDENT's patcher writes on ``coords`` (and our two resolutions)."""
    w, h = p.level0_size
    return {"patch_size": int(p.patch_size), "patch_size_level0": int(side0),
            "level0_magnification": p.level0_magnification, "target_magnification": p.magnification,
            "overlap": int(p.overlap), "name": p.slide, "savetodir": savetodir,
            "level0_width": int(w), "level0_height": int(h),
            "level0_mpp": float(p.level0_mpp), "mpp": float(p.mpp)}


def write_trident(path: str | Path, features: np.ndarray, boxes: np.ndarray, p: Patching, encoder: str,
                  extra: dict | None = None) -> Path:
    """Write one slide's features as TRIDENT does (atomically); ``boxes`` are (N, 4) square level-0 boxes."""
    path = Path(path)
    features = writable_features(features, path)
    side0 = square_side(boxes, len(features), path)
    check_inside(np.asarray(boxes, np.int64), p.level0_size, path)
    with writing(path) as f:
        f.attrs.update(extra or {})  # e.g. histoembed's content key: written with the file, renamed with it
        feats = f.create_dataset(FEATURES, data=features)
        for k, v in {"name": p.slide, "savetodir": str(path.parent), "encoder": encoder}.items():
            feats.attrs[k] = v
        coords = f.create_dataset(COORDS, data=np.asarray(boxes, np.int64)[:, :2])
        for k, v in coords_attributes(p, side0, str(path.parent)).items():
            coords.attrs[k] = v
    return path


# ---------------------------------------------------------------- reading

def _encoder_in_file(f: h5py.File, path: Path) -> str | None:
    """The encoder the file names (our ``encoder`` attribute), else its ``features_<encoder>`` folder."""
    own = text(f[FEATURES].attrs.get("encoder"))
    if own:
        return own
    folder = path.parent.name
    return folder[len("features_"):] or None if folder.startswith("features_") else None


def _grid_step(corners: np.ndarray, path: Path) -> int:
    """The patch side of a file that does not say it: the smallest step between patches of one row or column."""
    steps = []
    for axis in (0, 1):
        values = np.unique(corners[:, axis])
        if len(values) > 1:
            steps.append(int(np.diff(values).min()))
    if not steps:
        raise UserError("the file does not say its patch size and holds one patch, so no grid step tells it",
                        path=path, hint="import the file with its patching attributes (CLAM's patches/*.h5 "
                                        "coordinates) or leave the slide out")
    return min(steps)


def read_trident(f: h5py.File, path: Path, encoder: str | None = None, with_features: bool = True) -> FeatureFile:
    """A TRIDENT (or CLAM) file open in ``f`` as a ``FeatureFile``; what the file lacks or contradicts is a
    UserError naming it."""
    corners = check_coords(dataset(f, COORDS, path), path)
    dim = check_feature_shape(shape(f, FEATURES, path), len(corners), path, FEATURES)
    attrs = dict(f[COORDS].attrs)
    if "target_magnification" in attrs or "patch_size_level0" in attrs:
        kind = "trident"
        side0, size, mpp, level0_mpp, level0_size, overlap, inferred = _trident(attrs, path)
    else:
        kind = "clam"
        side0, inferred = _clam_side(attrs, corners, path)
        size = number(attrs.get("patch_size"), path, "patch_size")
        mpp = level0_mpp = level0_size = None
        overlap = 0
    boxes = boxes_of(corners, side0)
    check_inside(boxes, level0_size, path)
    features = check_features(dataset(f, FEATURES, path), len(boxes), path, FEATURES) if with_features else None
    in_file = _encoder_in_file(f, path)
    return FeatureFile(path, kind, path.stem, encoder or in_file, in_file, dim, boxes,
                       side0, int(size) if size else None, mpp, level0_mpp, level0_size, int(overlap),
                       inferred, features)


def _trident(attrs: dict, path: Path) -> tuple:
    """(side0, patch size, mpp, level-0 mpp, level-0 size, overlap, inferred) from TRIDENT's attributes."""
    size = number(attrs.get("patch_size"), path, "patch_size")
    target = number(attrs.get("target_magnification"), path, "target_magnification")
    level0_mag = number(attrs.get("level0_magnification"), path, "level0_magnification")
    side0 = number(attrs.get("patch_size_level0"), path, "patch_size_level0")
    inferred = None
    if not side0:
        if not (size and target and level0_mag):
            raise UserError("coords lacks 'patch_size_level0' and the patch size and magnifications to work it "
                            "out", path=path, hint="extract the slide's coordinates again with TRIDENT")
        side0 = round(size * level0_mag / target)
        inferred = "patch_size_level0 from patch_size x level0_magnification / target_magnification"
    mpp = number(attrs.get("mpp"), path, "mpp") or (10.0 / target if target else None)
    level0_mpp = number(attrs.get("level0_mpp"), path, "level0_mpp")
    w = number(attrs.get("level0_width"), path, "level0_width")
    h = number(attrs.get("level0_height"), path, "level0_height")
    overlap = number(attrs.get("overlap"), path, "overlap") or 0
    if int(side0) < 1:
        raise UserError(f"patch_size_level0 is {side0}", path=path)
    return (int(round(side0)), size, mpp, level0_mpp, (int(w), int(h)) if w and h else None, overlap, inferred)


def _clam_side(attrs: dict, corners: np.ndarray, path: Path) -> tuple[int, str | None]:
    """(patch side in level-0 px, what was inferred) of a CLAM file: ``patch_size`` times the level's downsample
    (its ``downsample`` attribute, or 1 at level 0) times ``custom_downsample``; without them, the grid's step."""
    size = number(attrs.get("patch_size"), path, "patch_size")
    if not size:
        return _grid_step(corners, path), "patch side from the grid's step (the file has no patching attributes)"
    level = int(number(attrs.get("patch_level"), path, "patch_level") or 0)
    custom = number(attrs.get("custom_downsample"), path, "custom_downsample") or 1.0
    down = attrs.get("downsample")
    if down is not None:
        factor = float(np.asarray(down, np.float64).reshape(-1)[0])
    elif level == 0:
        factor = 1.0
    else:
        return _grid_step(corners, path), (f"patch side from the grid's step (patch_level {level} without its "
                                           "downsample)")
    return max(1, round(size * factor * custom)), None
