"""Split-conformal sets: coverage 1 - alpha on new data, per class when class-conditional."""

from __future__ import annotations

import math

import numpy as np
import pytest

from histoembed.maths.metrics import softmax
from histoembed.models.heads import conformal


def _model(n, seed, C=4):
    """Probabilities of an imperfect model and labels drawn from a different (true) distribution."""
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(n, C)) * 2.0
    y = np.array([rng.choice(C, p=row) for row in softmax(true)])
    model = softmax(true * 1.6 + rng.normal(size=(n, C)) * 0.5)   # overconfident and noisy
    return model, y


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_coverage_is_within_003_of_one_minus_alpha_over_many_seeds(alpha):
    plain, per_class, size = [], [], []
    for seed in range(40):
        p_cal, y_cal = _model(300, 2 * seed)
        p_new, y_new = _model(1000, 2 * seed + 1)
        q = conformal.thresholds(p_cal, y_cal, alpha)
        sets = conformal.prediction_sets(p_new, q)
        plain.append(sets[np.arange(1000), y_new].mean())
        size.append(sets.sum(1).mean())
        qc = conformal.thresholds(p_cal, y_cal, alpha, class_conditional=True)
        sets_c = conformal.prediction_sets(p_new, qc)
        covered = sets_c[np.arange(1000), y_new]
        per_class.append([covered[y_new == c].mean() for c in range(4)])
    assert abs(np.mean(plain) - (1 - alpha)) < 0.03
    assert np.all(np.abs(np.mean(per_class, axis=0) - (1 - alpha)) < 0.03)
    assert 1 < np.mean(size) < 4


def test_quantile_is_the_finite_sample_rank_and_infinite_when_too_few():
    values = np.arange(1, 20) / 20          # 19 values
    assert conformal.quantile(values, 0.1) == values[math.ceil(20 * 0.9) - 1]
    assert conformal.quantile(values[:5], 0.1) == math.inf
    sets = conformal.prediction_sets(np.full((2, 3), 1 / 3), np.full(3, math.inf))
    assert sets.all()


def test_summary_reports_coverage_per_class_set_size_and_empty_sets():
    sets = np.array([[True, False], [False, False], [True, True], [False, True]])
    y = np.array([0, 0, 1, 0])
    s = conformal.coverage_summary(sets, y, ["a", "b"], 0.1)
    assert s["coverage"] == 0.5 and s["coverage_per_class"] == {"a": 1 / 3, "b": 1.0}
    assert s["mean_set_size"] == 1.0 and s["empty_sets"] == 0.25 and s["target_coverage"] == 0.9
