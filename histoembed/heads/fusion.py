"""Late fusion of the two heads: ``w * z_mlp / T_mlp + (1 - w) * z_xgb / T_xgb``.

w = 1 is the MLP alone, w = 0 XGBoost alone. The weight is the grid point with the best
macro-F1 on held-out logits; among equal scores the one closest to 0.5 wins (an even mix
is the prior when the data cannot tell the heads apart).
"""

from __future__ import annotations

import numpy as np

from histoembed.metrics import macro_f1


def weight_grid(points: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, points)


def fuse(z_mlp: np.ndarray, z_xgb: np.ndarray, w: float, t_mlp: float = 1.0, t_xgb: float = 1.0) -> np.ndarray:
    """Fused logits of the temperature-scaled heads."""
    return w * np.asarray(z_mlp, dtype=np.float64) / t_mlp + (1 - w) * np.asarray(z_xgb, dtype=np.float64) / t_xgb


def choose_weight(z_mlp: np.ndarray, z_xgb: np.ndarray, labels: np.ndarray, t_mlp: float, t_xgb: float,
                  points: int = 21) -> tuple[float, list[float]]:
    """(best w, macro-F1 at each grid point) on the given held-out logits."""
    labels = np.asarray(labels)
    n_classes = np.asarray(z_mlp).shape[1]
    grid = weight_grid(points)
    scores = [macro_f1(labels, fuse(z_mlp, z_xgb, w, t_mlp, t_xgb).argmax(axis=1), n_classes) for w in grid]
    best = max(scores)
    ties = [w for w, s in zip(grid, scores) if s >= best - 1e-12]
    w = min(ties, key=lambda v: (abs(v - 0.5), v))
    return float(w), [float(s) for s in scores]
