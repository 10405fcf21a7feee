"""Fusing several heads' survival risks or regression predictions (issue 29), cross-fitted like classification.

Survival: a Cox head's risks are comparable only within one fitted model (the partial likelihood does not
see a constant added to every risk), and heads differ in scale, so each fold model's risks are standardised
by their own mean and std on the rows that fold scores (no outcome is read for that), and the fusion is
``sum_h w_h * (risk_h - mean_h) / std_h``. Regression: ``sum_h w_h * prediction_h``. The weights lie on the
simplex grid of the classification fusion and are chosen by the out-of-fold Harrell C (survival) or squared
error (regression): the weights applied to fold k's rows come from the other folds' rows only, the final
weights (for the test set) from all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from histoembed.maths.survival import harrell_c
from histoembed.models.heads.fusion import _lattice, _tie_key

MAX_LATTICE = 2000   # weight vectors tried at most (the grid is made coarser for many heads)


def scale_of(z: np.ndarray) -> list[float]:
    """[mean, std] of one fold model's risks on the rows it scores (std 1 when they are all equal)."""
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    std = float(z.std()) if len(z) else 1.0
    return [float(z.mean()) if len(z) else 0.0, std if std > 1e-12 else 1.0]


def standardised(task: str, z: np.ndarray, scale: Sequence[float] | None) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    return (z - scale[0]) / scale[1] if task == "survival" and scale is not None else z


def fuse(task: str, outputs: dict[str, np.ndarray], weights: dict[str, float],
         scales: dict[str, Sequence[float]] | None = None) -> np.ndarray:
    """The fused risk or prediction of one fold model's heads' ``outputs`` (each [n] or [n, 1])."""
    heads = list(weights)
    return sum(weights[h] * standardised(task, outputs[h], None if scales is None else scales[h]) for h in heads)


def _score(task: str, fused: np.ndarray, y: np.ndarray) -> float:
    """Higher is better: Harrell's C, or minus the mean squared error."""
    if task == "survival":
        c = harrell_c(y[:, 0], y[:, 1], fused)
        return c if np.isfinite(c) else -np.inf
    return -float(np.mean((fused - y.reshape(-1)) ** 2))


def choose_weights(task: str, outputs: list[np.ndarray], y: np.ndarray, points: int) -> np.ndarray:
    """Simplex weights with the best score of the fused ``outputs`` (already standardised) against ``y``."""
    if len(outputs) == 1:
        return np.ones(1)
    while points > 2 and len(_lattice(len(outputs), points)) > MAX_LATTICE:
        points = (points + 1) // 2
    best, best_key = None, None
    for w in _lattice(len(outputs), points):
        fused = sum(wi * o for wi, o in zip(w, outputs))
        key = (-_score(task, fused, y), _tie_key(w))
        if best_key is None or key < best_key:
            best, best_key = w, key
    return np.asarray(best, dtype=np.float64)


def cross_fit(task: str, z: dict[str, np.ndarray], y: np.ndarray, fold: np.ndarray, points: int
              ) -> tuple[list[dict], dict]:
    """(per fold: its scales and the weights chosen on the other folds; final: weights on all rows, every
    fold's scales) for the heads' out-of-fold outputs ``z`` (head -> [n, 1])."""
    heads = list(z)
    folds = sorted(int(k) for k in np.unique(fold))
    scales = {k: {h: scale_of(z[h][fold == k]) for h in heads} for k in folds}
    std = {h: np.zeros(len(fold)) for h in heads}
    for k in folds:
        for h in heads:
            std[h][fold == k] = standardised(task, z[h][fold == k], scales[k][h])
    per_fold = []
    for k in folds:
        other = fold != k
        w = choose_weights(task, [std[h][other] for h in heads], y[other], points)
        per_fold.append({"fold": k, "weights": dict(zip(heads, w.tolist())), "scale": scales[k]})
    w = choose_weights(task, [std[h] for h in heads], y, points)
    final = {"task": task, "heads": heads, "weights": dict(zip(heads, w.tolist())),
             "scales": [scales[k] for k in folds]}
    return per_fold, final


def oof_fused(task: str, z: dict[str, np.ndarray], fold: np.ndarray, per_fold: list[dict]) -> np.ndarray:
    """Each row's fused output with its own fold's scales and weights (cross-fitted)."""
    out = np.zeros(len(fold))
    for p in per_fold:
        rows = fold == p["fold"]
        out[rows] = fuse(task, {h: z[h][rows] for h in p["weights"]}, p["weights"], p["scale"])
    return out


def oof_standardised(task: str, z: dict[str, np.ndarray], fold: np.ndarray, per_fold: list[dict]
                     ) -> dict[str, np.ndarray]:
    """Each head's out-of-fold outputs, survival risks standardised with their fold's scale."""
    out = {h: np.zeros(len(fold)) for h in z}
    for p in per_fold:
        rows = fold == p["fold"]
        for h in z:
            out[h][rows] = standardised(task, z[h][rows], p["scale"][h])
    return out
