"""N-way fusion on the simplex: the reference two-head rule exactly, grid to three, search beyond."""

from __future__ import annotations

import numpy as np
import pytest

from histoembed.maths.metrics import macro_f1
from histoembed.models.heads import fusion


def _reference_choose_weight(z_mlp, z_xgb, labels, t_mlp, t_xgb, points):
    """The two-head rule as the reference recipe (and this project before N-way fusion) had it."""
    grid = np.linspace(0.0, 1.0, points)
    n_classes = z_mlp.shape[1]
    scores = [macro_f1(labels, (w * z_mlp / t_mlp + (1 - w) * z_xgb / t_xgb).argmax(1), n_classes) for w in grid]
    best = max(scores)
    ties = [w for w, s in zip(grid, scores) if s >= best - 1e-12]
    return float(min(ties, key=lambda v: (abs(v - 0.5), v))), scores


@pytest.mark.parametrize("points", [5, 11, 21, 41])
def test_two_members_give_exactly_the_reference_weight(points):
    rng = np.random.default_rng(points)
    for trial in range(30):
        n = int(rng.integers(20, 120))
        y = rng.integers(0, 4, n)
        z1 = np.eye(4)[y] * rng.random() * 3 + rng.normal(size=(n, 4)) * rng.random() * 3
        z2 = np.eye(4)[y] * rng.random() * 3 + rng.normal(size=(n, 4)) * rng.random() * 3
        if trial % 3 == 0:
            z2 = z1.copy()   # every weight ties
        t1, t2 = 0.5 + rng.random(), 0.5 + rng.random()
        w, scores = fusion.choose_weight(z1, z2, y, t1, t2, points)
        ref_w, ref_scores = _reference_choose_weight(z1, z2, y, t1, t2, points)
        assert w == ref_w and scores == ref_scores
        np.testing.assert_array_equal(fusion.fuse(z1, z2, w, t1, t2), w * z1 / t1 + (1 - w) * z2 / t2)


def _members(n_members, n=150, seed=0, good=()):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    out = []
    for i in range(n_members):
        useful = i in good
        out.append(np.eye(3)[y] * (2.0 if useful else 0.0) + rng.normal(size=(n, 3)) * (1.0 if useful else 4.0))
    return out, y


def test_three_members_search_the_whole_grid_and_find_the_only_useful_member():
    members, y = _members(3, good=(2,))
    choice = fusion.choose_weights(members, y, points=11)
    assert choice.weights[2] > 0.8 and abs(sum(choice.weights) - 1) < 1e-12
    assert min(choice.weights) >= 0 and choice.scores is None
    assert choice.macro_f1 == macro_f1(y, fusion.fuse_members(members, choice.weights).argmax(1), 3)


def test_ties_go_to_equal_weights():
    members, y = _members(1, good=(0,))
    same = [members[0]] * 3
    choice = fusion.choose_weights(same, y, points=4)   # steps of 1/3: equal weights lie on the grid
    np.testing.assert_allclose(choice.weights, [1 / 3] * 3, atol=1e-12)
    choice = fusion.choose_weights([members[0]] * 5, y)
    np.testing.assert_allclose(choice.weights, [0.2] * 5)


def test_coordinate_search_beyond_three_members_finds_the_useful_ones():
    members, y = _members(5, seed=1, good=(1, 3))
    choice = fusion.choose_weights(members, y)
    assert choice.weights[1] + choice.weights[3] > 0.7
    assert abs(sum(choice.weights) - 1) < 1e-9 and min(choice.weights) >= 0
    equal = macro_f1(y, fusion.fuse_members(members, [0.2] * 5).argmax(1), 3)
    assert choice.macro_f1 > equal


def test_temperatures_divide_each_member():
    members, y = _members(2, good=(0, 1))
    fused = fusion.fuse_members(members, [0.3, 0.7], [2.0, 0.5])
    np.testing.assert_allclose(fused, 0.3 * members[0] / 2.0 + 0.7 * members[1] / 0.5)
    with pytest.raises(ValueError):
        fusion.fuse_members(members, [1.0])


def test_weight_ties_go_to_the_middle_and_a_useless_head_gets_no_weight():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    good = np.eye(3)[y] * 5
    w, scores = fusion.choose_weight(good, good, y, 1.0, 1.0, 21)
    assert w == 0.5 and len(scores) == 21
    noise = rng.normal(size=(90, 3)) * 50
    w, _ = fusion.choose_weight(good, noise, y, 1.0, 1.0, 21)
    assert w > 0.9
    w, _ = fusion.choose_weight(noise, good, y, 1.0, 1.0, 21)
    assert w < 0.1


def test_fusion_curve_ends_are_the_single_heads():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    z_mlp, z_xgb = rng.normal(size=(60, 3)), rng.normal(size=(60, 3))
    _, curve = fusion.choose_weight(z_mlp, z_xgb, y, 1.5, 0.7, points=2)   # w = 0, 1
    assert curve[0] == pytest.approx(macro_f1(y, z_xgb.argmax(1), 3))
    assert curve[1] == pytest.approx(macro_f1(y, z_mlp.argmax(1), 3))
