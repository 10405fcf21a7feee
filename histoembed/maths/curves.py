"""ROC and precision-recall curves with pointwise bootstrap bands, ready to plot.

A curve is read on a fixed grid so that resamples can be stacked: the ROC curve as the best true-positive
rate reached at a false-positive rate of at most x (a step function, as the curve is), the precision-recall
curve as the interpolated precision, the best precision at a recall of at least x (the usual convention;
it is what makes a PR curve monotone). Each resample (patients when ``groups`` is given, images otherwise,
as in :mod:`histoembed.maths.resample`) gives one curve on the grid; the band is their pointwise 2.5 and
97.5 percentiles. A pointwise band is not a band for the whole curve at once: read it at one x at a time.

:func:`roc_points` and :func:`pr_points` give the exact curve (every distinct threshold), equal to
scikit-learn's ``roc_curve(drop_intermediate=False)`` and ``precision_recall_curve`` (the order reversed:
here from the highest threshold down).
"""

from __future__ import annotations

import numpy as np

from histoembed.maths.metrics import binary_auroc, binary_average_precision
from histoembed.maths.resample import LEVEL, Resampler

GRID_POINTS = 101   # x values 0, 0.01, ..., 1 of every plotted curve
CURVE_RESAMPLES = 200


def _counts(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, false positives, threshold) at each distinct threshold, highest threshold first."""
    positive = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], positive[order]
    last = np.concatenate([np.flatnonzero(s[1:] != s[:-1]), [len(s) - 1]])
    tps = np.cumsum(t)[last].astype(np.float64)
    return tps, (last + 1) - tps, s[last]


def roc_points(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, threshold) from (0, 0, inf) to (1, 1, lowest score)."""
    tps, fps, thr = _counts(positive, score)
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = np.concatenate([[0.0], fps / fps[-1]])
        tpr = np.concatenate([[0.0], tps / tps[-1]])
    return fpr, tpr, np.concatenate([[np.inf], thr])


def pr_points(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) at each distinct threshold, highest first (recall rising)."""
    tps, fps, thr = _counts(positive, score)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tps / (tps + fps), tps / tps[-1], thr


def _roc_on_grid(positive, score, grid: np.ndarray) -> np.ndarray:
    fpr, tpr, _ = roc_points(positive, score)
    return tpr[np.searchsorted(fpr, grid, side="right") - 1]


def _pr_on_grid(positive, score, grid: np.ndarray) -> np.ndarray:
    precision, recall, _ = pr_points(positive, score)
    best_after = np.maximum.accumulate(precision[::-1])[::-1]       # best precision at this recall or more
    idx = np.minimum(np.searchsorted(recall, grid, side="left"), len(recall) - 1)
    return best_after[idx]


def curve_band(kind: str, positive: np.ndarray, score: np.ndarray, *, groups=None, n: int = CURVE_RESAMPLES,
               seed: int = 0, level: float = LEVEL, points: int = GRID_POINTS) -> dict:
    """One class's ROC (``kind="roc"``) or precision-recall (``"pr"``) curve on a grid with its band.

    Returns ``{"x": grid, "y": curve, "lo": [...], "hi": [...], "area": AUROC or AP on all rows,
    "unit": "patients"|"images", "resamples": usable, "skipped": degenerate}`` (x is the false-positive
    rate for ROC, the recall for PR). Resamples without a positive or a negative row are skipped.
    """
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    grid = np.linspace(0.0, 1.0, points)
    on_grid = _roc_on_grid if kind == "roc" else _pr_on_grid
    area = binary_auroc if kind == "roc" else binary_average_precision
    sampler = Resampler(len(positive), groups, seed)
    curves = []
    for _ in range(max(n, 0)):
        idx = sampler.draw()
        t = positive[idx]
        if t.all() or not t.any():
            continue
        curves.append(on_grid(t, score[idx], grid))
    tail = 100 * (1 - level) / 2
    if curves:
        lo, hi = np.percentile(np.stack(curves), [tail, 100 - tail], axis=0)
    else:
        lo = hi = np.full(points, np.nan)
    whole = area(positive, score)
    return {"kind": kind, "x": grid.tolist(), "y": _json(on_grid(positive, score, grid)), "lo": _json(lo),
            "hi": _json(hi), "area": float(whole) if np.isfinite(whole) else None, "unit": sampler.unit,
            "resamples": len(curves), "skipped": max(n, 0) - len(curves)}


def _json(values: np.ndarray) -> list:
    """NaN (a class without positives or negatives) as None: JSON has no NaN."""
    return [float(v) if np.isfinite(v) else None for v in values]


def curve_bands(y: np.ndarray, probs: np.ndarray, classes: list[str], *, groups=None, n: int = CURVE_RESAMPLES,
                seed: int = 0) -> dict:
    """ROC and PR bands of out-of-fold probabilities: ``{"roc": {class: band}, "pr": {class: band}}``.

    Two classes: only ``classes[1]`` (the positive class); more: one-vs-rest, one band per class.
    """
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    shown = [1] if len(classes) == 2 else range(len(classes))
    return {kind: {classes[k]: curve_band(kind, y == k, probs[:, k], groups=groups, n=n, seed=seed)
                   for k in shown} for kind in ("roc", "pr")}
