"""Regularised temperature scaling: never runs away on separable data, still fixes overconfidence."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from histoembed.core.errors import UserError
from histoembed.maths.metrics import nll, softmax
from histoembed.models.heads import calibration, decisions


def _overconfident(n, seed):
    """Labels drawn from softmax(true logits); the model reports those logits x 4."""
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(n, 4)) * 1.5
    p = softmax(true)
    y = np.array([rng.choice(4, p=row) for row in p])
    return true * 4.0, y


def _separable_with_one_mistake(n, scale, seed, C=3):
    """Separable logits (true class ahead by a margin) except for one image, which is confidently wrong."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % C
    z = rng.normal(size=(n, C)) * 0.3
    z[np.arange(n), y] += 2.0 + rng.random(n)
    wrong = int(rng.integers(n))
    z[wrong, y[wrong]] -= 4.0
    return z * scale, y


def _cross_fitted_nll(z, y, folds, fit_t):
    fold = np.arange(len(y)) % folds
    before = after = 0.0
    for k in range(folds):
        t = fit_t(z[fold != k], y[fold != k])
        held = fold == k
        before += calibration.temperature_nll(z[held], y[held], 1.0) * held.sum()
        after += calibration.temperature_nll(z[held], y[held], t) * held.sum()
    return before / len(y), after / len(y)


def _plain_minimiser(z, y):
    res = minimize_scalar(lambda lt: calibration.temperature_nll(z, y, np.exp(lt)),
                          bounds=calibration.LOG_T_BOUNDS, method="bounded")
    return float(np.exp(res.x))


@pytest.mark.parametrize("scale", [0.1, 0.3, 1.0, 3.0, 10.0, 30.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_separable_logits_with_one_held_out_mistake_do_not_raise_nll(scale, seed):
    z, y = _separable_with_one_mistake(48, scale, seed)
    before, after = _cross_fitted_nll(z, y, 5, calibration.fit_temperature)
    assert after <= before + 0.01   # "not worse beyond noise": at scale 3 T = 1 is already about right
    for k in range(5):
        assert calibration.LOG_T_BOUNDS[0] + 0.5 < np.log(calibration.fit_temperature(z[np.arange(48) % 5 != k],
                                                                                       y[np.arange(48) % 5 != k]))


def test_the_plain_nll_minimiser_runs_away_on_the_same_data():
    """The failure the regulariser prevents: T to the bound, NLL ten times worse."""
    z, y = _separable_with_one_mistake(48, 1.0, 0)
    before, after = _cross_fitted_nll(z, y, 5, _plain_minimiser)
    assert after > 3 * before
    regular_before, regular_after = _cross_fitted_nll(z, y, 5, calibration.fit_temperature)
    assert regular_after < regular_before


def test_an_overconfident_model_still_gets_t_above_one_and_lower_heldout_nll():
    z_fit, y_fit = _overconfident(600, 0)
    z_new, y_new = _overconfident(600, 1)
    t = calibration.fit_temperature(z_fit, y_fit)
    assert 3.0 < t < 5.5   # the true over-confidence factor is 4
    assert calibration.temperature_nll(z_new, y_new, t) < 0.7 * calibration.temperature_nll(z_new, y_new, 1.0)
    np.testing.assert_array_equal(calibration.apply_temperature(z_new, t).argmax(1), z_new.argmax(1))
    z_small, y_small = _overconfident(40, 3)
    assert calibration.fit_temperature(z_small, y_small) > 1.5


def test_temperature_below_one_for_an_underconfident_model():
    z, y = _overconfident(500, 2)
    assert calibration.fit_temperature(z / 16, y) < 1.0


def test_t_is_one_with_a_reason_when_the_data_cannot_support_one():
    z, y = _overconfident(100, 4)
    few = calibration.choose_temperature(z[:5], y[:5])
    assert few.value == 1.0 and "5 held-out images" in few.note
    one_class = calibration.choose_temperature(z, np.zeros(100, dtype=int))
    assert one_class.value == 1.0 and "one class" in one_class.note
    flat = calibration.choose_temperature(np.ones((100, 4)) * 3.0, y)
    assert flat.value == 1.0 and "do not differ" in flat.note
    fitted = calibration.choose_temperature(z, y)
    assert fitted.note is None and fitted.value != 1.0
    assert fitted.as_dict() == {"T": fitted.value, "note": None}


def test_non_finite_logits_are_an_error_not_a_silent_t_of_one():
    z, y = _overconfident(50, 5)
    z[3, 1] = np.nan
    with pytest.raises(UserError, match="not finite"):
        calibration.fit_temperature(z, y)


# ---------------------------------------------------------------- a temperature only where it helps (issue 35)

def _noisy(n, seed, C=3, signal=1.0):
    """Logits with a little signal and much noise, at a random scale (over- or under-confident)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % C
    z = rng.normal(size=(n, C))
    z[np.arange(n), y] += signal
    return z * rng.choice([0.3, 1.0, 3.0, 10.0]), y


def _oof_nll(z, y, fold, temps):
    t = np.array([temps[int(k)].value for k in fold])[:, None]
    return nll(softmax(z), y), nll(softmax(z / t), y)


@pytest.mark.parametrize("n", [8, 12, 16])
@pytest.mark.parametrize("folds", [2, 3, 5])
def test_on_tiny_cohorts_the_checked_temperatures_never_raise_the_out_of_fold_nll(n, folds):
    """8-16 items, 2-5 folds, separable and noisy logits, heads and fused: after <= before (issue 35)."""
    for seed in range(6):
        for z, y in (_separable_with_one_mistake(n, [0.3, 3.0, 30.0][seed % 3], seed), _noisy(n, seed)):
            fold = np.random.default_rng(seed).permutation(n) % folds
            per_fold, final = calibration.cross_fitted_temperatures(z, y, fold)
            before, after = _oof_nll(z, y, fold, per_fold)
            assert after <= before + 1e-9, (n, folds, seed, before, after, per_fold)
            assert all(c.value == (c.fitted if c.applied else 1.0) and c.why for c in per_fold + [final])
            z2 = z[:, ::-1] * 0.5 + _noisy(n, seed + 100)[0]      # a second head for the fused decision
            params, last = decisions.cross_fit({"a": z, "b": z2}, y, fold, decisions.DecisionSettings())
            for key, (plain, calibrated) in decisions.calibrated_probabilities({"a": z, "b": z2}, fold,
                                                                                params).items():
                assert nll(calibrated, y) <= nll(plain, y) + 1e-9, (key, n, folds, seed)
            assert set(last["fused_calibration"]) == {"applied", "why"}


def test_a_temperature_is_kept_at_1_when_the_nested_check_finds_no_gain_and_says_why():
    z, y = _separable_with_one_mistake(12, 1.0, 0)
    fold = np.arange(12) % 3        # 8 images choose fold k's T, 4 and 4 remain for the nested check
    per_fold, final = calibration.cross_fitted_temperatures(z, y, fold)
    for c in per_fold:
        assert not c.applied and c.value == 1.0
        assert "images" in c.why       # too few to fit on 4, or no gain on the held-out folds: said in words
    two = calibration.cross_fitted_temperatures(*_overconfident(60, 0), np.arange(60) % 2)[0]
    assert all("no fold to check" in c.why and c.value == 1.0 for c in two)


def test_on_reference_sized_data_the_checked_temperature_keeps_its_gain():
    """600 over-confident images, 10 folds: every fold and the final apply T (about 4), as the plain rule did."""
    z, y = _overconfident(600, 0)
    fold = np.arange(600) % 10
    per_fold, final = calibration.cross_fitted_temperatures(z, y, fold)
    assert all(c.applied for c in per_fold) and final.applied and 3.0 < final.value < 5.5
    for k, c in enumerate(per_fold):
        assert c.value == calibration.fit_temperature(z[fold != k], y[fold != k])  # the unchecked rule's T
    before, after = _oof_nll(z, y, fold, per_fold)
    assert after < 0.7 * before
    z_new, y_new = _overconfident(600, 1)
    assert calibration.temperature_nll(z_new, y_new, final.value) < 0.7 * calibration.temperature_nll(z_new, y_new, 1)
