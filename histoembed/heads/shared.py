"""What the fold loop, the heads and inference share: class weights and per-image pooling."""

from __future__ import annotations

import numpy as np

from histoembed import store


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse class frequency, scaled so a balanced set has weights 1 (0 for absent classes)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)


def image_mean(values: np.ndarray, image: np.ndarray, n_images: int) -> np.ndarray:
    """Mean of ``values`` rows per image index in ``image`` (0..n_images-1)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.zeros((n_images, values.shape[1]))
    np.add.at(sums, image, values)
    counts = np.bincount(image, minlength=n_images)[:, None]
    return sums / np.maximum(counts, 1)


def first_seen_index(values: np.ndarray) -> tuple[list, np.ndarray]:
    """(distinct values in first-seen order, index of each element in that list)."""
    uniq, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return [uniq[i] for i in order], rank[inverse.reshape(-1)]


def view_means(features: store.Features, row_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """XGBoost's samples: per (image, view), the mean of that view's crop embeddings.

    Returns (embeddings [pairs, D] float32, image index of each pair).
    """
    views = features.view.astype(np.int64)
    n_views = int(views.max()) + 1 if len(views) else 1
    pair = row_image * n_views + views
    order = np.argsort(pair, kind="stable")
    sorted_pair = pair[order]
    starts = np.flatnonzero(np.r_[True, sorted_pair[1:] != sorted_pair[:-1]])
    sums = np.add.reduceat(features.embedding[order].astype(np.float64), starts, axis=0)
    counts = np.diff(np.r_[starts, len(order)])[:, None]
    return (sums / counts).astype(np.float32), sorted_pair[starts] // n_views
