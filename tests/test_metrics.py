"""The metric functions equal scikit-learn's on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, log_loss, precision_recall_fscore_support

from histoembed.maths import metrics


@pytest.fixture
def predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 2 * np.eye(4)[y] * rng.random((200, 1))
    logits[:, 3] -= 3  # class 3 is rarely predicted
    return y, metrics.softmax(logits)


def test_macro_f1_confusion_and_per_class_equal_sklearn(predictions):
    y, probs = predictions
    pred = probs.argmax(1)
    assert metrics.macro_f1(y, pred, 4) == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    cm = metrics.confusion(y, pred, 4)
    np.testing.assert_array_equal(cm, confusion_matrix(y, pred, labels=range(4)))
    p, r, f, s = metrics.per_class_scores(cm)
    sp, sr, sf, ss = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    np.testing.assert_allclose([p, r, f, s], [sp, sr, sf, ss])


def test_macro_f1_with_an_absent_class_follows_sklearn():
    y, pred = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    assert metrics.macro_f1(y, pred, 3) == pytest.approx(f1_score(y, pred, average="macro"))


def test_nll_equals_log_loss(predictions):
    y, probs = predictions
    assert metrics.nll(probs, y) == pytest.approx(log_loss(y, probs, labels=range(4)), rel=1e-9)


def test_ece_is_zero_when_confidence_equals_accuracy_and_gap_otherwise():
    y = np.array([0, 0, 0, 1])           # 3 of 4 correct at confidence 0.75
    probs = np.tile([0.75, 0.25], (4, 1))
    assert metrics.ece(probs, y) == pytest.approx(0.0)
    probs = np.tile([0.95, 0.05], (4, 1))
    assert metrics.ece(probs, y) == pytest.approx(0.2)


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded(predictions):
    y, probs = predictions
    pred = probs.argmax(1)
    lo, hi = metrics.bootstrap_macro_f1(y, pred, 4, n=300, seed=1)
    assert lo < metrics.macro_f1(y, pred, 4) < hi
    assert (lo, hi) == metrics.bootstrap_macro_f1(y, pred, 4, n=300, seed=1)


def test_summary_reports_fold_spread_and_calibration_change(predictions):
    y, probs = predictions
    folds = np.arange(len(y)) % 4
    s = metrics.summary(y, probs, ["a", "b", "c", "d"], probs_before=metrics.softmax(np.log(probs) * 3),
                        folds=folds, bootstrap=50)
    assert len(s["fold_macro_f1"]) == 4
    assert s["fold_mean"] == pytest.approx(np.mean(s["fold_macro_f1"]))
    assert s["nll_before_calibration"] > s["nll"]
    assert sum(c["support"] for c in s["per_class"].values()) == len(y)


def test_view_spread_is_zero_for_identical_views_and_one_for_disjoint_ones():
    from histoembed.maths.metrics import view_spread

    probs = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
    image = np.array([0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(view_spread(probs, image, 3), [0.0, 0.5, 0.0])


def test_accuracy_by_quantile_uses_equal_count_bins_in_order():
    from histoembed.maths.metrics import accuracy_by_quantile

    values = np.arange(8, dtype=float)
    correct = np.array([1, 1, 1, 1, 0, 1, 0, 0], dtype=bool)
    bins = accuracy_by_quantile(values, correct, bins=4)
    assert [b["accuracy"] for b in bins] == [1.0, 1.0, 0.5, 0.0]
    assert bins[0]["low"] == 0 and bins[-1]["high"] == 7 and sum(b["images"] for b in bins) == 8


def test_paired_bootstrap_difference_is_zero_for_the_same_predictions_and_signed():
    from histoembed.maths.metrics import paired_bootstrap_difference

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    noisy = np.where(rng.random(200) < 0.5, y, rng.integers(0, 3, 200))
    assert paired_bootstrap_difference(y, noisy, noisy, 3, n=200) == (0.0, 0.0, 0.0)
    diff, lo, hi = paired_bootstrap_difference(y, noisy, y, 3, n=200)
    assert diff > 0 and 0 < lo <= diff <= hi


def test_reliability_of_a_calibrated_and_an_overconfident_model():
    y = np.array([0] * 8 + [1] * 2)
    calibrated = np.tile([0.8, 0.2], (10, 1))          # says 0.8, right 8 times in 10
    overconfident = np.tile([0.99, 0.01], (10, 1))
    assert metrics.ece(calibrated, y) == pytest.approx(0.0)
    assert metrics.ece(overconfident, y) == pytest.approx(0.19)
    conf, acc, count = metrics.reliability(overconfident, y)
    assert count.sum() == 10 and conf[count > 0] == pytest.approx([0.99]) and acc[count > 0] == pytest.approx([0.8])


def test_macro_f1_matches_scikit_learn():
    rng = np.random.default_rng(1)
    y, pred = rng.integers(0, 4, 50), rng.integers(0, 3, 50)   # class 3 never predicted
    assert metrics.macro_f1(y, pred, 4) == pytest.approx(
        f1_score(y, pred, labels=[0, 1, 2, 3], average="macro", zero_division=0))
