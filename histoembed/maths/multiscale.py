"""Crops of several scales on their way into the heads (``fit --scale-fusion``).

``crops --scales 1,2`` cuts each crop again with twice the context around it. The heads read
bags of crop embeddings (``heads.base.Bags``), so there are two ways in:

* ``crops``: a context crop is one more crop of its image (the bags grow, nothing else changes);
* ``concat``: per image and view, the mean embedding of each scale's crops, concatenated in
  ascending scale: one row of scales x D per bag, so a head sees what the blob looks like and
  what lies around it side by side rather than mixed in one mean.

The same fusion runs in ``fit`` and wherever the fitted heads predict (submit, predict), with
the scales the models were fitted on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from histoembed.core.errors import UserError
from histoembed.core.feature_store import Features

RULES = {
    "crops": "every crop, whatever its scale, is one crop of its image",
    "concat": "per image and view, the mean embedding of each scale's crops, concatenated in ascending scale",
}


def scales_of(features: Features) -> list[float]:
    """The distinct crop scales of ``features`` (ascending; [1.0] when no scale was attached)."""
    return sorted({float(s) for s in features.scale}) if features.scale is not None else [1.0]


def fuse_scales(features: Features, mode: str, scales: Sequence[float] | None = None) -> Features:
    """``features`` as the heads read them under ``mode`` (see the module docstring).

    ``scales`` are the scales to concatenate (default: those present); a row of another scale, or an
    image without a crop of one of them, stops with a message, since the concatenated rows would not
    line up with what the heads were fitted on.
    """
    if mode == "crops":
        return features
    if mode != "concat":
        raise ValueError(f"unknown scale fusion {mode!r}")
    if features.scale is None:
        raise ValueError("concat needs each row's scale (feature_store.with_scales)")
    scales = [float(s) for s in (scales if scales is not None else scales_of(features))]
    dim = features.embedding.shape[1] if features.embedding.ndim == 2 else 0
    if len(features) == 0:
        return Features(features.image_id, features.split, features.crop_index, features.view,
                        np.zeros((0, dim * len(scales)), np.float32), features.meta)
    where = np.searchsorted(scales, features.scale)
    where = np.minimum(where, len(scales) - 1)
    other = np.asarray(scales)[where] != features.scale
    if other.any():
        found = sorted({float(s) for s in features.scale[other]})
        raise UserError(f"crops of scale {', '.join(f'{s:g}' for s in found)} among the features, but the heads "
                        f"read scales {', '.join(f'{s:g}' for s in scales)}",
                        hint="re-run `histoembed fit` after `histoembed crops` and `histoembed embed`")
    keys = features.keys()
    _, image_of = np.unique(keys, return_inverse=True)
    views = features.view.astype(np.int64)
    bag_id = image_of.reshape(-1) * (int(views.max()) + 1) + views
    bags, bag_of = np.unique(bag_id, return_inverse=True)
    S = len(scales)
    cell = bag_of.reshape(-1) * S + where                   # one (bag, scale) cell per row
    order = np.argsort(cell, kind="stable")
    cells, starts, counts = np.unique(cell[order], return_index=True, return_counts=True)
    if len(cells) != len(bags) * S:
        missing = sorted(set(range(len(bags) * S)) - set(cells.tolist()))[0]
        row = int(np.flatnonzero(bag_of == missing // S)[0])
        raise UserError(f"{features.split[row]} image {features.image_id[row]} has no crop of scale "
                        f"{scales[missing % S]:g} (view {int(features.view[row])}): --scale-fusion concat needs "
                        "every scale of every image",
                        hint="re-run `histoembed crops` (every crop is cut at every scale), then embed and fit")
    sums = np.add.reduceat(features.embedding[order].astype(np.float64), starts, axis=0)
    means = (sums / counts[:, None]).astype(np.float32).reshape(len(bags), S * dim)
    first = np.unique(bag_of, return_index=True)[1]         # one source row per bag, for its names
    return Features(features.image_id[first], features.split[first], np.zeros(len(bags), np.int32),
                    features.view[first], means, features.meta)
