"""Per-class offsets for macro-F1: ``argmax(log p + b)`` instead of ``argmax(log p)``.

Calibrated probabilities answer "how likely is each class"; macro-F1 rewards getting the small
classes right (the reference task's Triple negative, 77 of 691 images), which argmax of
well-calibrated probabilities under-predicts. An additive offset per class on the log-
probabilities moves the decision boundaries without touching the probabilities themselves.

The offsets are chosen by coordinate ascent on a grid (each class's offset in turn takes every
grid value; a move must strictly improve macro-F1, so ties keep the offsets at 0). They are
chosen on held-out predictions; the fit stage cross-fits them (the offsets applied to a fold
are chosen on the other folds) and always reports the plain argmax score beside them.
"""

from __future__ import annotations

import numpy as np

from histoembed.maths.metrics import macro_f1

GRID = np.round(np.linspace(-2.0, 2.0, 41), 6)   # offsets on the log-probability scale, steps of 0.1
ROUNDS = 4


def apply_offsets(log_probs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Class predictions ``argmax(log_probs + offsets)``."""
    return (np.asarray(log_probs, dtype=np.float64) + np.asarray(offsets, dtype=np.float64)).argmax(axis=1)


def choose_offsets(log_probs: np.ndarray, labels: np.ndarray, grid: np.ndarray = GRID,
                   rounds: int = ROUNDS, score=None) -> np.ndarray:
    """Offsets [C] with the best macro-F1 of ``argmax(log_probs + offsets)`` on these held-out rows.

    ``score(labels, decided)`` (higher better, e.g. ``metrics.decision_score("balanced_accuracy", C)``)
    replaces macro-F1 when given (``fit --select-by``).
    """
    L = np.asarray(log_probs, dtype=np.float64)
    labels = np.asarray(labels)
    C = L.shape[1]
    if score is None:
        score = lambda yy, pred: macro_f1(yy, pred, C)  # noqa: E731
    b = np.zeros(C)
    best = _finite(score(labels, apply_offsets(L, b)))
    for _ in range(rounds):
        moved = False
        for c in range(C):
            for value in grid:
                if value == b[c]:
                    continue
                trial = b.copy()
                trial[c] = value
                s = _finite(score(labels, apply_offsets(L, trial)))
                if s > best + 1e-12:
                    b, best, moved = trial, s, True
        if not moved:
            break
    return b


def _finite(value: float) -> float:
    """An undefined score (kappa of one grade only) never wins a move."""
    return float(value) if np.isfinite(value) else -np.inf
