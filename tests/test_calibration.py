"""Regularised temperature scaling: never runs away on separable data, still fixes overconfidence."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from histoembed.core.errors import UserError
from histoembed.maths.metrics import softmax
from histoembed.models.heads import calibration


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
