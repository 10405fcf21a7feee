"""STAMP's feature files (KatherLab/STAMP 2.x), written and read.

One HDF5 file per slide in ``<extractor>/``, named by the slide's stem: dataset ``feats`` (N, D) and dataset
``coords`` (N, 2) with each tile's top-left corner in micrometres from the slide's level-0 origin; file attributes
``extractor``, ``unit = "um"``, ``tile_size_um``, ``tile_size_px`` and ``feat_type = "tile"``. STAMP's tiles are
``tile_size_um`` wide and embedded at ``tile_size_px`` pixels, so they were embedded at
``tile_size_um / tile_size_px`` microns per pixel.

Micrometres need the slide's microns per level-0 pixel to become level-0 boxes. Our files carry it as an extra
attribute ``level0_mpp`` (with ``level0_width``/``level0_height``), which STAMP ignores; a STAMP-made file needs
it from the slide. We write ``feats`` as float32 (STAMP writes float16 and reads either as float).
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

FEATURES, COORDS = "feats", "coords"


def feature_path(out: str | Path, p: Patching, encoder: str) -> Path:
    """Where STAMP keeps the slide's features: ``OUT/<extractor>/<slide>.h5``."""
    return Path(out) / encoder_slug(encoder) / f"{p.slide}.h5"


def write_stamp(path: str | Path, features: np.ndarray, boxes: np.ndarray, p: Patching, encoder: str,
                extra: dict | None = None) -> Path:
    """Write one slide's features as STAMP does (atomically): corners in micrometres, tile size in both units."""
    path = Path(path)
    features = writable_features(features, path)
    side0 = square_side(boxes, len(features), path)
    boxes = np.asarray(boxes, np.int64)
    check_inside(boxes, p.level0_size, path)
    with writing(path) as f:
        f.attrs.update(extra or {})  # e.g. histoembed's content key: written with the file, renamed with it
        f.create_dataset(COORDS, data=(boxes[:, :2] * float(p.level0_mpp)).astype(np.float32))
        f.create_dataset(FEATURES, data=features)
        w, h = p.level0_size
        for k, v in {"extractor": encoder, "unit": "um", "tile_size_um": float(side0 * p.level0_mpp),
                     "tile_size_px": int(p.patch_size), "feat_type": "tile", "level0_mpp": float(p.level0_mpp),
                     "level0_width": int(w), "level0_height": int(h)}.items():
            f.attrs[k] = v
    return path


def read_stamp(f: h5py.File, path: Path, encoder: str | None = None, level0_mpp: float | None = None,
               with_features: bool = True) -> FeatureFile:
    """A STAMP file open in ``f`` as a ``FeatureFile``; ``level0_mpp`` (the slide's) is needed unless the file
    says it. What the file lacks or contradicts is a UserError naming it."""
    attrs = dict(f.attrs)
    feat_type = text(attrs.get("feat_type")) or "tile"
    if feat_type != "tile":
        raise UserError(f"the file holds {feat_type}-level features (feat_type), not one vector per tile",
                        path=path, hint="import the tile features STAMP's preprocessing wrote, not its encoding")
    corners = check_coords(dataset(f, COORDS, path), path)
    dim = check_feature_shape(shape(f, FEATURES, path), len(corners), path, FEATURES)
    tile_um = number(attrs.get("tile_size_um"), path, "tile_size_um")
    if not tile_um and text(attrs.get("unit")) == "um":  # STAMP 2.0: tile_size with unit um
        tile_um = number(attrs.get("tile_size"), path, "tile_size")
    if not tile_um:
        raise UserError("the file does not say its tile size in micrometres (no 'tile_size_um'): an older STAMP "
                        "file with coordinates in pixels", path=path,
                        hint="extract the features again with STAMP 2 (`stamp preprocess`)")
    tile_px = number(attrs.get("tile_size_px"), path, "tile_size_px")
    own_mpp = number(attrs.get("level0_mpp"), path, "level0_mpp")
    mpp0 = level0_mpp or own_mpp
    if not mpp0:
        raise UserError("STAMP coordinates are micrometres and the file does not say the slide's microns per pixel",
                        path=path, hint="read it with its slide (its microns per pixel turn micrometres into "
                                        "level-0 pixels)")
    w, h = number(attrs.get("level0_width"), path, "level0_width"), number(attrs.get("level0_height"), path,
                                                                           "level0_height")
    side0 = max(1, round(tile_um / mpp0))
    boxes = boxes_of(corners / mpp0, side0)
    size = (int(w), int(h)) if w and h else None
    check_inside(boxes, size, path)
    features = check_features(dataset(f, FEATURES, path), len(boxes), path, FEATURES) if with_features else None
    in_file = text(attrs.get("extractor"))
    return FeatureFile(path, "stamp", path.stem, encoder or in_file, in_file, dim, boxes, side0,
                       int(tile_px) if tile_px else None, tile_um / tile_px if tile_px else None, mpp0, size,
                       0, None, features)
