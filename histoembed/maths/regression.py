"""Regression numbers (issue 29): R², Pearson and Spearman r, MAE with intervals, and conformal intervals.

Each number is a numpy twin of the reference (scikit-learn's ``r2_score`` and ``mean_absolute_error``,
scipy's ``pearsonr`` and ``spearmanr``), equal to it on the same input (tests/test_metrics.py), and
undefined (NaN) where the reference is degenerate: R² of a constant target (scikit-learn then reports 1
or 0 by convention), a correlation with a constant side. The bootstrap skips such resamples.

- R²: the share of the target's variance the predictions explain; 0 for predicting the mean, negative
  when worse than that. It rewards getting the scale right, not only the order.
- Pearson r: linear agreement, blind to a wrong scale or offset (a calibrated model has r² close to R²).
- Spearman r: agreement of the orders (Pearson r of the average ranks): what a ranking use needs.
- MAE: the typical error, in the target's unit.

Split-conformal intervals: with out-of-fold absolute residuals |y - prediction| as scores, the
ceil((n + 1)(1 - alpha))-th smallest is a half-width q such that a new row's interval prediction ± q
holds its target with probability at least 1 - alpha (rows exchangeable). :func:`conformal_summary`
cross-fits it (fold k's rows get the q of the other folds' residuals) so the measured coverage is honest,
and gives the q of all residuals for new rows (``predict`` / ``submit``).
"""

from __future__ import annotations

import math

import numpy as np

from histoembed.maths.metrics import average_ranks
from histoembed.maths.resample import BOOTSTRAP_RESAMPLES, LEVEL, bootstrap_many

NAMES = ("r2", "pearson_r", "spearman_r", "mae")


def _pair(y, pred) -> tuple[np.ndarray, np.ndarray]:
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    if y.shape != pred.shape or y.ndim != 1:
        raise ValueError(f"target {y.shape} and prediction {pred.shape} must be 1-D of the same length")
    return y, pred


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot; NaN for a constant target."""
    y, pred = _pair(y, pred)
    ss_tot = float(np.sum((y - y.mean()) ** 2)) if len(y) else 0.0
    return 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def pearson_r(y: np.ndarray, pred: np.ndarray) -> float:
    """Pearson's correlation; NaN when either side is constant."""
    y, pred = _pair(y, pred)
    a, b = y - y.mean(), pred - pred.mean()
    denom = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b))) if len(y) else 0.0
    return float(np.clip(np.sum(a * b) / denom, -1.0, 1.0)) if denom > 0 else float("nan")


def spearman_r(y: np.ndarray, pred: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson r of the average ranks, ties sharing their mean rank)."""
    y, pred = _pair(y, pred)
    return pearson_r(average_ranks(y), average_ranks(pred))


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean absolute error, in the target's unit."""
    y, pred = _pair(y, pred)
    return float(np.mean(np.abs(y - pred))) if len(y) else float("nan")


def _all(y, pred) -> list[float]:
    return [r2(y, pred), pearson_r(y, pred), spearman_r(y, pred), mae(y, pred)]


def regression_numbers(y: np.ndarray, pred: np.ndarray, *, groups=None, n: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0, level: float = LEVEL) -> dict:
    """R², Pearson r, Spearman r and MAE of out-of-fold predictions, each with its interval, JSON-ready::

        {"unit": "patients", "resamples": 1000, "level": 0.95, "rows": 300,
         "r2": {"value", "lo", "hi", "unit", "resamples", "skipped"}, "pearson_r": {...},
         "spearman_r": {...}, "mae": {...}}

    ``groups`` (patient of each row) makes the intervals resample patients, else rows; all four numbers
    come from the same resamples.
    """
    y, pred = _pair(y, pred)
    numbers = bootstrap_many(_all, y, pred, size=len(NAMES), groups=groups, n=n, seed=seed, level=level)
    out = {"unit": numbers[0].unit, "resamples": n, "level": level, "rows": int(len(y))}
    out.update({name: iv.as_dict() for name, iv in zip(NAMES, numbers)})
    return out


def conformal_half_width(abs_residuals: np.ndarray, alpha: float) -> float:
    """The split-conformal half-width: the ceil((n + 1)(1 - alpha))-th smallest absolute residual
    (inf when there are too few residuals for that level)."""
    values = np.sort(np.asarray(abs_residuals, dtype=np.float64))
    k = math.ceil((len(values) + 1) * (1 - alpha))
    return float(values[k - 1]) if 1 <= k <= len(values) else math.inf


def conformal_summary(y: np.ndarray, pred: np.ndarray, folds: np.ndarray, alpha: float = 0.1) -> dict:
    """Cross-fitted conformal intervals of out-of-fold predictions and their measured coverage::

        {"alpha": .1, "target_coverage": .9, "coverage": .91, "mean_width": 4.2,
         "half_width": 2.1,                         # from all residuals: for new rows, prediction ± it
         "fold_half_width": {"0": 2.0, "1": 2.2, ...}, "row_half_width": [...]}   # per out-of-fold row

    ``folds`` gives each row's fold; row i's interval uses the half-width of the residuals of the other
    folds only, so the coverage is measured on rows that did not set their own interval. A half-width
    that too few residuals cannot set (n < 1/alpha - 1) is unbounded: None in the dict, and such rows
    count as covered. Rows are assumed exchangeable: with several rows per patient, pass one row per
    patient (e.g. the patient's mean prediction) for a patient-level guarantee.
    """
    y, pred = _pair(y, pred)
    folds = np.asarray(folds)
    residual = np.abs(y - pred)
    fold_q = {k: conformal_half_width(residual[folds != k], alpha) for k in np.unique(folds)}
    row_q = np.array([fold_q[k] for k in folds], dtype=np.float64)
    finite = np.isfinite(row_q)
    return {"alpha": alpha, "target_coverage": 1 - alpha,
            "coverage": float(np.mean(residual <= row_q)) if len(y) else float("nan"),
            "mean_width": float(np.mean(2 * row_q[finite])) if finite.any() else None,
            "half_width": _finite(conformal_half_width(residual, alpha)),
            "fold_half_width": {str(k): _finite(q) for k, q in fold_q.items()},
            "row_half_width": [_finite(q) for q in row_q]}


def _finite(x: float) -> float | None:
    """JSON has no infinity: a half-width too few residuals cannot set (unbounded interval) is None."""
    return float(x) if math.isfinite(x) else None
