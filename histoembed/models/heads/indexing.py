"""What the fold loop, the heads and inference share: class weights and image indexing.

Per-image and per-view pooling lives in ``base.Bags``."""

from __future__ import annotations

import numpy as np


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse class frequency, scaled so a balanced set has weights 1 (0 for absent classes)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)


def first_seen_index(values: np.ndarray) -> tuple[list, np.ndarray]:
    """(distinct values in first-seen order, index of each element in that list)."""
    uniq, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return [uniq[i] for i in order], rank[inverse.reshape(-1)]
