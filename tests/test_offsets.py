"""Per-class offsets: they recover a minority class that argmax under-predicts, and stay 0 on ties."""

from __future__ import annotations

import numpy as np

from histoembed.maths.metrics import log_softmax, macro_f1
from histoembed.models.heads import offsets


def _imbalanced(n, seed):
    """Calibrated probabilities of 3 classes, class 2 rare and weakly separated: argmax rarely says 2."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.45, 0.45, 0.10])
    z = np.eye(3)[y] * 1.2 + rng.normal(size=(n, 3))
    z[:, 2] += np.log(0.10 / 0.45)   # the prior of the rare class
    return log_softmax(z), y


def test_offsets_raise_macro_f1_of_an_under_predicted_minority_on_new_data():
    L, y = _imbalanced(2000, 0)
    b = offsets.choose_offsets(L, y)
    assert b[2] - b[:2].mean() > 0.3
    L_new, y_new = _imbalanced(2000, 1)
    plain = macro_f1(y_new, L_new.argmax(1), 3)
    shifted = macro_f1(y_new, offsets.apply_offsets(L_new, b), 3)
    assert shifted > plain + 0.02
    assert (offsets.apply_offsets(L_new, b) == 2).sum() > (L_new.argmax(1) == 2).sum()


def test_offsets_stay_zero_when_argmax_is_already_perfect():
    y = np.arange(60) % 3
    L = log_softmax(np.eye(3)[y] * 5.0)
    np.testing.assert_array_equal(offsets.choose_offsets(L, y), np.zeros(3))
