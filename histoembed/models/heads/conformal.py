"""Split-conformal prediction sets from calibrated probabilities.

The score of an image is ``1 - p(true class)``. On held-out images, the threshold q is the
``ceil((n + 1)(1 - alpha)) / n`` empirical quantile of the scores, and a new image's set is
every class c with ``1 - p_c <= q``: it contains the true class with probability at least
1 - alpha (exchangeability), and is small when the model is sure. Class-conditional sets use
one threshold per class, from the held-out images of that class, so each class (the small one
too) is covered at 1 - alpha, at the cost of larger sets.

Sets may be empty when no class is likely enough; that is part of the guarantee, not a bug,
and the fit stage reports how often it happens. The fit stage cross-fits the thresholds (fold
k's sets use thresholds from the other folds) to report honest out-of-fold coverage.
"""

from __future__ import annotations

import math

import numpy as np


def scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Non-conformity of each held-out image: ``1 - p(true class)``."""
    p = np.asarray(probs, dtype=np.float64)
    return 1.0 - p[np.arange(len(p)), np.asarray(labels)]


def quantile(values: np.ndarray, alpha: float) -> float:
    """The split-conformal threshold: the ceil((n+1)(1-alpha))-th smallest value (inf when n is too small)."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    n = len(values)
    k = math.ceil((n + 1) * (1 - alpha))
    return float(values[k - 1]) if 1 <= k <= n else math.inf


def thresholds(probs: np.ndarray, labels: np.ndarray, alpha: float, class_conditional: bool = False) -> np.ndarray:
    """One threshold per class (all equal unless ``class_conditional``)."""
    labels = np.asarray(labels)
    C = np.asarray(probs).shape[1]
    s = scores(probs, labels)
    if not class_conditional:
        return np.full(C, quantile(s, alpha))
    return np.array([quantile(s[labels == c], alpha) for c in range(C)])


def prediction_sets(probs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Boolean [n, C]: class c is in image i's set when ``1 - p_ic <= q_c``."""
    return (1.0 - np.asarray(probs, dtype=np.float64)) <= np.asarray(q, dtype=np.float64)[None, :] + 1e-12


def coverage_summary(sets: np.ndarray, labels: np.ndarray, classes: list[str], alpha: float) -> dict:
    """Coverage overall and per class, mean set size and the share of empty sets."""
    labels = np.asarray(labels)
    covered = sets[np.arange(len(labels)), labels]
    return {
        "alpha": alpha, "target_coverage": 1 - alpha,
        "coverage": float(covered.mean()) if len(labels) else float("nan"),
        "coverage_per_class": {c: (float(covered[labels == k].mean()) if (labels == k).any() else None)
                               for k, c in enumerate(classes)},
        "mean_set_size": float(sets.sum(axis=1).mean()) if len(labels) else float("nan"),
        "empty_sets": float((sets.sum(axis=1) == 0).mean()) if len(labels) else float("nan"),
    }
