"""The metric functions equal scikit-learn's on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, log_loss, precision_recall_fscore_support

from histoembed.maths import metrics, reported


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


# ----- AUROC, average precision, balanced accuracy, kappa, intervals over patients (issue 34)

@pytest.fixture
def tied_predictions():
    """Four classes, probabilities rounded to one decimal so that many scores tie."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 300)
    probs = metrics.softmax(rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y])
    probs = np.round(probs, 1) + 1e-3
    return y, probs / probs.sum(1, keepdims=True)


def test_ranking_metrics_equal_sklearn_with_ties(tied_predictions):
    from sklearn.metrics import (average_precision_score, balanced_accuracy_score, cohen_kappa_score,
                                 roc_auc_score)
    from sklearn.preprocessing import label_binarize

    y, probs = tied_predictions
    pred = probs.argmax(1)
    assert metrics.auroc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-12)
    for k in range(4):
        assert metrics.auroc_per_class(y, probs)[k] == pytest.approx(roc_auc_score(y == k, probs[:, k]), abs=1e-12)
        assert metrics.average_precision_per_class(y, probs)[k] == pytest.approx(
            average_precision_score(y == k, probs[:, k]), abs=1e-12)
    assert metrics.average_precision(y, probs) == pytest.approx(
        average_precision_score(label_binarize(y, classes=range(4)), probs, average="macro"), abs=1e-12)
    assert metrics.balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    order = ["c", "a", "d", "b"]                      # grades differ from the class indices
    ranks = metrics.class_ranks(["a", "b", "c", "d"], order)
    assert metrics.quadratic_kappa(y, pred, ranks) == pytest.approx(
        cohen_kappa_score(ranks[y], ranks[pred], weights="quadratic", labels=range(4)), abs=1e-12)
    yb = (y > 1).astype(int)                          # binary: class 1's column
    pb = np.stack([1 - probs[:, 0], probs[:, 0]], 1)
    assert metrics.auroc(yb, pb) == pytest.approx(roc_auc_score(yb, pb[:, 1]), abs=1e-12)
    assert metrics.average_precision(yb, pb) == pytest.approx(average_precision_score(yb, pb[:, 1]), abs=1e-12)
    assert np.isnan(metrics.binary_auroc(np.ones(5, bool), np.arange(5)))   # sklearn raises: one class only


def test_curve_points_equal_sklearn_and_the_band_holds_the_curve(tied_predictions):
    from sklearn.metrics import precision_recall_curve, roc_curve

    from histoembed.maths import curves

    y, probs = tied_predictions
    t, s = y == 2, probs[:, 2]
    fpr, tpr, thr = curves.roc_points(t, s)
    sf, st, sthr = roc_curve(t, s, drop_intermediate=False)
    np.testing.assert_allclose([fpr, tpr], [sf, st])
    np.testing.assert_allclose(thr[1:], sthr[1:])
    precision, recall, _ = curves.pr_points(t, s)
    sp, sr, _ = precision_recall_curve(t, s)
    np.testing.assert_allclose(precision, sp[:-1][::-1])
    np.testing.assert_allclose(recall, sr[:-1][::-1])
    bands = curves.curve_bands(y, probs, ["a", "b", "c", "d"], groups=np.arange(300) // 3, n=50)
    roc = bands["roc"]["c"]
    assert roc["unit"] == "patients" and roc["area"] == pytest.approx(metrics.binary_auroc(t, s))
    lo, hi, mid = (np.array(roc[k], dtype=float) for k in ("lo", "hi", "y"))
    assert np.all(lo <= hi) and np.mean((lo <= mid + 1e-9) & (mid <= hi + 1e-9)) > 0.9
    assert len(bands["pr"]) == 4 and bands["pr"]["a"]["y"][0] > 0


def test_ranking_numbers_resample_patients_and_report_every_number(tied_predictions):
    y, probs = tied_predictions
    classes = ["a", "b", "c", "d"]
    out = reported.ranking_numbers(y, probs, classes, groups=np.arange(300) // 2, order=["a", "b", "c", "d"],
                                  n=100, per_class_intervals=False)
    assert out["unit"] == "patients" and out["auroc"]["unit"] == "patients"
    assert out["auroc"]["value"] == pytest.approx(metrics.auroc(y, probs))
    assert out["auroc"]["lo"] < out["auroc"]["value"] < out["auroc"]["hi"]
    assert out["quadratic_kappa"]["lo"] < out["quadratic_kappa"]["value"] < out["quadratic_kappa"]["hi"]
    assert set(out["auroc_per_class"]) == set(classes) and out["auroc_per_class"]["a"]["lo"] is None
    import json
    json.dumps(out, allow_nan=False)
    binary = reported.ranking_numbers((y > 1).astype(int), np.stack([probs[:, :2].sum(1), probs[:, 2:].sum(1)], 1),
                                     ["low", "high"], n=20)
    assert binary["positive_class"] == "high" and binary["unit"] == "images" and "auroc_per_class" not in binary


def test_group_bootstrap_draws_patients_so_duplicated_rows_do_not_narrow_the_interval():
    from histoembed.maths.resample import bootstrap

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 80)
    probs = metrics.softmax(np.stack([np.zeros(80), rng.normal(size=80) + y], 1))
    patient = np.arange(80)
    once = bootstrap(metrics.auroc, y, probs, groups=patient, n=300, seed=2)
    copies = np.repeat(np.arange(80), 5)              # every patient's row five times (five slides alike)
    five = bootstrap(metrics.auroc, y[copies], probs[copies], groups=patient[copies], n=300, seed=2)
    assert five.unit == once.unit == "patients"
    assert (five.value, five.lo, five.hi) == pytest.approx((once.value, once.lo, once.hi), abs=1e-12)
    rows = bootstrap(metrics.auroc, y[copies], probs[copies], n=300, seed=2)  # wrongly treated as independent
    assert rows.unit == "images" and rows.hi - rows.lo < 0.7 * (five.hi - five.lo)


def test_degenerate_resamples_are_skipped_and_counted_and_the_paired_difference_is_signed():
    from histoembed.maths.resample import bootstrap, paired_bootstrap

    y = np.array([0] * 19 + [1])                      # one positive: most resamples lack it
    probs = np.stack([1 - np.linspace(0, 1, 20), np.linspace(0, 1, 20)], 1)
    iv = bootstrap(metrics.auroc, y, probs, n=200, seed=0)
    assert iv.skipped > 0 and iv.resamples + iv.skipped == 200
    assert iv.as_dict()["skipped"] == iv.skipped
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150)
    good = metrics.softmax(np.stack([np.zeros(150), 2.0 * y + rng.normal(size=150)], 1))
    noise = metrics.softmax(np.stack([np.zeros(150), rng.normal(size=150)], 1))
    d = paired_bootstrap(metrics.auroc, (y, noise), (y, good), groups=np.arange(150) // 3, n=300)
    assert d.unit == "patients" and 0 < d.lo < d.value < d.hi
    same = paired_bootstrap(metrics.auroc, (y, good), (y, good), n=50)
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0)


# ----- Regression numbers and conformal intervals (issue 29)

def test_regression_numbers_equal_sklearn_and_scipy_and_conformal_coverage_holds():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, r2_score

    from histoembed.maths import regression

    rng = np.random.default_rng(7)
    y = np.round(rng.normal(size=400), 1)             # rounded: ties in both ranks
    pred = np.round(0.8 * y + 0.5 * rng.normal(size=400), 1)
    assert regression.r2(y, pred) == pytest.approx(r2_score(y, pred), abs=1e-12)
    assert regression.pearson_r(y, pred) == pytest.approx(pearsonr(y, pred)[0], abs=1e-12)
    assert regression.spearman_r(y, pred) == pytest.approx(spearmanr(y, pred)[0], abs=1e-12)
    assert regression.mae(y, pred) == pytest.approx(mean_absolute_error(y, pred), abs=1e-12)
    assert np.isnan(regression.r2(np.ones(5), np.arange(5.0)))
    out = regression.regression_numbers(y, pred, groups=np.arange(400) // 4, n=200)
    assert out["unit"] == "patients"
    for name in regression.NAMES:
        assert out[name]["lo"] < out[name]["value"] < out[name]["hi"]
    noise = regression.regression_numbers(y, rng.permutation(pred), n=200)
    assert noise["pearson_r"]["lo"] < 0 < noise["pearson_r"]["hi"] and noise["r2"]["hi"] < 0
    folds = np.arange(400) % 5
    conf = regression.conformal_summary(y, pred, folds, alpha=0.1)
    assert 0.86 <= conf["coverage"] <= 0.95 and len(conf["row_half_width"]) == 400
    assert conf["half_width"] == pytest.approx(np.sort(np.abs(y - pred))[int(np.ceil(401 * 0.9)) - 1])
    assert set(conf["fold_half_width"]) == {"0", "1", "2", "3", "4"}
    import json
    json.dumps([out, conf], allow_nan=False)
    few = regression.conformal_summary(y[:6], pred[:6], folds[:6] % 2, alpha=0.1)   # too few for 90 %
    assert few["half_width"] is None and few["coverage"] == 1.0 and few["mean_width"] is None


def test_scorers_by_name_feed_the_paired_bootstrap_over_patients(tied_predictions):
    from histoembed.maths.resample import paired_bootstrap

    y, probs = tied_predictions
    worse = metrics.softmax(np.log(probs) * 0.3 + np.random.default_rng(0).normal(size=probs.shape))
    ranks = metrics.class_ranks(list("abcd"), list("abcd"))
    for name in metrics.SELECTABLE:
        score = metrics.scorer(name, 4, ranks)
        d = paired_bootstrap(score, (y, worse), (y, probs), groups=np.arange(300) // 3, n=100)
        better = d.value < 0 if name in metrics.LOWER_IS_BETTER else d.value > 0
        assert better and d.unit == "patients", name
    with pytest.raises(ValueError, match="order"):
        metrics.scorer("kappa", 4)


def test_spread_over_repeats_leaves_out_undefined_repeats():
    from histoembed.maths.resample import spread_over_repeats

    out = spread_over_repeats([0.8, 0.9, float("nan"), None, 0.7])
    assert out["repeats"] == 3 and out["mean"] == pytest.approx(0.8) and out["std"] == pytest.approx(0.1)
    assert spread_over_repeats([None])["mean"] is None and spread_over_repeats([0.5])["std"] is None


def test_a_curve_of_a_class_without_positives_is_json_ready():
    import json

    from histoembed.maths import curves

    band = curves.curve_band("roc", np.zeros(10, bool), np.linspace(0, 1, 10), n=5)
    assert band["area"] is None and band["resamples"] == 0 and band["skipped"] == 5
    json.dumps(band, allow_nan=False)


def test_reported_values_are_scikit_learns_and_the_twins_agree(tied_predictions):
    """metrics.json's values come from scikit-learn's functions; the bootstrap's numpy twins give the same."""
    from sklearn.metrics import (average_precision_score, balanced_accuracy_score, cohen_kappa_score,
                                 roc_auc_score)

    y, probs = tied_predictions
    pred = probs.argmax(1)
    pred[:7] = 0                                    # the decisions need not be the argmax (class offsets)
    order = ["b", "a", "d", "c"]
    ranks = metrics.class_ranks(["a", "b", "c", "d"], order)
    out = reported.ranking_numbers(y, probs, ["a", "b", "c", "d"], pred=pred, order=order, n=0)
    assert out["auroc"]["value"] == roc_auc_score(y, probs, multi_class="ovr")
    assert out["balanced_accuracy"]["value"] == balanced_accuracy_score(y, pred)
    assert out["quadratic_kappa"]["value"] == cohen_kappa_score(ranks[y], ranks[pred], weights="quadratic",
                                                                labels=range(4))
    assert out["auroc_per_class"]["c"]["value"] == roc_auc_score(y == 2, probs[:, 2])
    assert out["average_precision_per_class"]["d"]["value"] == average_precision_score(y == 3, probs[:, 3])
    twins = {"auroc": metrics.auroc(y, probs), "average_precision": metrics.average_precision(y, probs),
             "balanced_accuracy": metrics.balanced_accuracy(y, pred),
             "quadratic_kappa": metrics.quadratic_kappa(y, pred, ranks)}
    for name, twin in twins.items():
        assert out[name]["value"] == pytest.approx(twin, abs=1e-12)
    offsets = reported.decision_numbers(y, pred, groups=np.arange(300) // 3, ranks=ranks, n=50)
    assert offsets["balanced_accuracy"]["value"] == out["balanced_accuracy"]["value"]
    assert offsets["quadratic_kappa"]["unit"] == "patients" and offsets["quadratic_kappa"]["lo"] is not None
    absent = reported.sklearn_values(np.where(y == 3, 0, y), probs, pred)   # class d has no image
    assert np.isnan(absent["auroc"]) and np.isnan(absent["average_precision:3"]) and absent["auroc:0"] > 0.5


def test_selection_scores_choose_weights_and_offsets_by_the_named_metric():
    """fit --select-by: the fusion weights maximise the named metric of the fused probabilities; offsets follow
    a metric of decisions and are left to macro-F1 for one of probabilities."""
    from histoembed.models.heads import decisions, fusion

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    z = {"good": rng.normal(size=(120, 3)) + 2 * np.eye(3)[y], "noise": rng.normal(size=(120, 3)) * 3}
    auc = metrics.selection_score("auroc", 3)
    choice = fusion.choose_weights(list(z.values()), y, points=11, score=auc)
    assert choice.weights[0] > 0.5
    assert choice.macro_f1 == pytest.approx(metrics.auroc(y, metrics.softmax(
        fusion.fuse_members(list(z.values()), choice.weights))))
    nll = metrics.selection_score("nll", 3)
    assert nll(y, metrics.softmax(z["good"])) == pytest.approx(-metrics.nll(metrics.softmax(z["good"]), y))
    assert metrics.decision_score("auroc", 3) is None
    with pytest.raises(ValueError, match="order"):
        metrics.decision_score("kappa", 3)
    for name in ("balanced_accuracy", "kappa", "auroc"):
        s = decisions.DecisionSettings(weight_points=6, select_by=name, ranks=(0, 1, 2))
        params = decisions.choose(z, y, np.arange(120), s)
        assert params["selected_by"] == name and len(params["offsets"]) == 3
    default = decisions.choose(z, y, np.arange(120), decisions.DecisionSettings(weight_points=6))
    assert "selected_by" not in default


def test_resampled_auroc_equals_the_auroc_of_each_resample_drawn_out():
    rng = np.random.default_rng(3)
    score = np.round(rng.normal(size=40), 1)          # rounded: ties within and across the groups
    pos = np.arange(40) < 15
    w_pos, w_neg = rng.integers(0, 3, (6, 15)), rng.integers(0, 3, (6, 25))
    w_pos[:, 0] += 1
    w_neg[:, 0] += 1                                  # every resample draws both groups
    got = metrics.resampled_auroc(score[pos], score[~pos], w_pos, w_neg)
    for b in range(6):
        drawn_pos, drawn_neg = np.repeat(score[pos], w_pos[b]), np.repeat(score[~pos], w_neg[b])
        labels = np.r_[np.ones(len(drawn_pos), bool), np.zeros(len(drawn_neg), bool)]
        assert got[b] == pytest.approx(metrics.binary_auroc(labels, np.r_[drawn_pos, drawn_neg]), abs=1e-12)
