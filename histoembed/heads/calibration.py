"""Temperature scaling: one T > 0 per head, chosen to minimise the NLL of held-out logits.

Dividing logits by one positive number never changes their argmax, so calibration cannot
change a prediction, only how confident it is. T is found by a bounded scalar search over
log T (always positive, never stuck like the widely copied LBFGS-on-T snippet).
"""

from __future__ import annotations

import numpy as np

from histoembed.metrics import log_softmax

LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / temperature)`` at the true labels."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.01, 100] minimising the NLL of ``logits / T`` (1.0 when there is nothing to fit)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if len(labels) == 0 or not np.isfinite(logits).all():
        return 1.0
    result = minimize_scalar(lambda log_t: temperature_nll(logits, labels, float(np.exp(log_t))),
                             bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5})
    return float(np.exp(result.x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return np.asarray(logits, dtype=np.float64) / temperature
