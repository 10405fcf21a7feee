"""Every registered head against one contract, then what is particular to each."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histoembed.core.config import ABMILSettings, LogRegSettings, MLPSettings, XGBSettings
from histoembed.core.errors import UserError
from histoembed.models.heads import REGISTRY, Bags, check_names, get
from histoembed.models.heads.abmil import ABMILHead
from histoembed.models.heads.mlp import MLPHead
from histoembed.models.heads.training import lr_factor
from histoembed.models.heads.xgb import PCA_FILE, XGBHead, fit_pca
from histoembed.models.maps import heads_that, heads_that_see_crops

SMALL = {"mlp": MLPSettings(hidden=16, epochs=30, patience=5, batch_size=32),
         "xgb": XGBSettings(n_estimators=40, pca_dims=6, early_stopping_rounds=5),
         "logreg": LogRegSettings(),
         "abmil": ABMILSettings(hidden=16, attention=8, epochs=30, patience=5, batch_size=16)}


def make_bags(n_images=90, crops=3, views=2, dim=12, seed=0, signal_crops=None):
    """Bags of a 3-class problem: the class shifts every crop (or only crop 0 when signal_crops == 1)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_images) % 3
    rows, image, view, crop = [], [], [], []
    for i in range(n_images):
        for c in range(crops):
            shift = 2 * np.eye(3, dim)[y[i]] * (3.0 if signal_crops == 1 else 1.0) \
                if (signal_crops is None or c < signal_crops) else 0.0
            base = rng.normal(size=dim) + shift
            for v in range(views):
                rows.append(base + rng.normal(size=dim) * 0.2 * v)
                image.append(i)
                view.append(v)
                crop.append(c)
    # shuffle the rows: Bags must not depend on the store's row order
    order = rng.permutation(len(rows))
    X = np.asarray(rows, np.float32)[order]
    bags = Bags.from_rows(X, np.asarray(image)[order], np.asarray(view)[order])
    bags.crop = np.asarray(crop)[order]      # per input row, for the attention test
    return bags, y


def split(bags, y, n_fit=60, n_stop=15):
    imgs = np.arange(len(y))
    fit, stop, held = bags.select(imgs[:n_fit]), bags.select(imgs[n_fit:n_fit + n_stop]), bags.select(imgs[n_fit + n_stop:])
    return (fit, y[fit.image]), (stop, y[stop.image]), (held, y[held.image])


def test_registry_holds_every_head_in_one_place_and_names_unknown_ones():
    assert set(REGISTRY) == {"mlp", "xgb", "logreg", "abmil", "ridge", "coxnet"}
    assert heads_that("gives_attention") == ["abmil"] and heads_that("scores_crops") == ["mlp"]
    assert heads_that_see_crops() == ["mlp", "abmil"]
    with pytest.raises(ValueError, match="no head capability"):
        heads_that("abmil")
    assert check_names(["mlp", " xgb", "mlp", ""]) == ("mlp", "xgb")
    with pytest.raises(UserError, match="(?s)unknown head 'svm'.*mlp, xgb, logreg, abmil"):
        get("svm")
    with pytest.raises(UserError, match="no head"):
        check_names([" "])


@pytest.mark.parametrize("name", sorted(n for n, c in REGISTRY.items() if "classification" in c.tasks))
def test_head_contract(name, tmp_path):
    cls = REGISTRY[name]
    bags, y = make_bags()
    (fit, y_fit), (stop, y_stop), (held, y_held) = split(bags, y)
    head = cls(SMALL[name], 3, seed=0)
    assert head.input_dim_ is None
    assert head.fit(fit, y_fit, stop, y_stop) is head                       # fit returns self
    assert head.input_dim_ == 12
    fitted = [a for a in vars(head) if a.endswith("_") and getattr(head, a) is not None]
    assert len(fitted) >= 2                                                  # fitted attributes end in _
    z = head.predict(held)
    assert z.shape == (held.n_bags, 3) and np.isfinite(z).all()
    image_acc = (held.per_image(z).argmax(1) == held.image_labels(y_held)).mean()
    assert image_acc > 0.7                                                   # it learns the signal
    assert head.predict(held.select(np.array([], dtype=int))).shape == (0, 3)
    # what it declares beyond the contract, it does (crop maps ask the declaration, never the name)
    if cls.gives_attention:
        weight = head.attention(held)
        assert weight.shape == (len(held.X),) and np.allclose(np.add.reduceat(weight, held.starts[:-1]), 1)
    else:
        with pytest.raises(NotImplementedError, match="no attention"):
            head.attention(held)
    if cls.scores_crops:
        assert head.row_logits(held.X).shape == (len(held.X), 3)
    else:
        with pytest.raises(NotImplementedError, match="single crops"):
            head.row_logits(held.X)
    # deterministic for a seed
    np.testing.assert_array_equal(cls(SMALL[name], 3, seed=0).fit(fit, y_fit, stop, y_stop).predict(held), z)
    # save / load: the same logits, no pickle, the classes and dimension recorded
    head.save(tmp_path, ["a", "b", "c"])
    loaded = cls.load(tmp_path)
    np.testing.assert_allclose(loaded.predict(held), z, rtol=1e-5, atol=1e-6)
    assert loaded.classes_ == ["a", "b", "c"] and loaded.input_dim_ == 12 and loaded.seed == 0
    assert json.loads((tmp_path / f"{name}.json").read_text())["head"] == name
    for path in tmp_path.iterdir():
        assert path.suffix in {".json", ".safetensors", ".ubj"}
        assert not path.read_bytes().startswith(b"\x80")                     # no pickle protocol header
    # without its weights file, load says which file is missing
    weights = next(p for p in tmp_path.iterdir() if p.suffix != ".json")
    weights.unlink()
    with pytest.raises(UserError, match="missing"):
        cls.load(tmp_path)


def test_bags_group_rows_by_image_and_view_whatever_their_order():
    bags, _ = make_bags(n_images=4, crops=3, views=2)
    assert bags.n_bags == 8 and list(bags.sizes) == [3] * 8
    assert list(bags.image) == [0, 0, 1, 1, 2, 2, 3, 3] and list(bags.view) == [0, 1] * 4
    sub = bags.select(np.array([2, 0]))
    assert list(sub.image) == [0, 0, 2, 2] and list(sub.index) == [0, 1, 4, 5]
    np.testing.assert_allclose(sub.means(), bags.means()[[0, 1, 4, 5]], rtol=1e-6)
    padded, mask = sub.padded()
    assert padded.shape == (4, 3, 12) and mask.all()
    np.testing.assert_allclose(sub.per_image(np.eye(4)[:, :2]), [[0.5, 0.5], [0.0, 0.0]])


def test_bags_of_a_subset_copy_their_rows_only_when_read_and_match_a_copy():
    bags, _ = make_bags(n_images=10, crops=3, views=2)
    means = bags.means().copy()
    old_means = (np.add.reduceat(bags.X.astype(np.float64), bags.starts[:-1], axis=0)
                 / bags.sizes[:, None]).astype(np.float32)
    np.testing.assert_array_equal(means, old_means)       # blockwise sums: the very same numbers
    sub = bags.select(np.array([7, 2, 5]))
    assert sub._rows is not None                          # nothing copied yet ...
    np.testing.assert_array_equal(sub.means(), means[np.isin(bags.image, [2, 5, 7])])
    assert sub._rows is not None                          # ... nor for the means the full set already has
    subsub = sub.select(np.array([5]))
    expect = bags.X[np.repeat(np.isin(bags.image, [2, 5, 7]), bags.sizes)]
    np.testing.assert_array_equal(sub.X, expect)
    np.testing.assert_array_equal(subsub.X, bags.X[np.repeat(bags.image == 5, bags.sizes)])
    full, mask = sub.padded()
    part, part_mask = sub.padded(np.array([3, 1]), K=4)
    assert part.shape == (2, 4, 12) and not part[:, 3].any() and part_mask[:, :3].all()
    np.testing.assert_array_equal(part[:, :3], full[[3, 1]])
    half = Bags.from_rows(bags.X.astype(np.float16), bags.image[bags.row_bag], bags.view[bags.row_bag])
    assert half.X.dtype == np.float32
    np.testing.assert_array_equal(half.X, bags.X.astype(np.float16).astype(np.float32))


def test_abmil_max_instances_samples_big_bags_per_step_and_leaves_small_ones_alone():
    bags, y = make_bags(n_images=60, crops=6, seed=1)
    (fit, y_fit), (stop, y_stop), (held, _) = split(bags, y, 40, 10)
    s = ABMILSettings(hidden=8, attention=4, epochs=3, patience=2, batch_size=8)
    plain = ABMILHead(s, 3, seed=0).fit(fit, y_fit, stop, y_stop).predict(held)
    roomy = ABMILHead(s.model_copy(update={"max_instances": 6}), 3, seed=0).fit(fit, y_fit, stop, y_stop)
    np.testing.assert_array_equal(roomy.predict(held), plain)     # no bag is larger: the same fit
    capped = [ABMILHead(s.model_copy(update={"max_instances": 2}), 3, seed=0).fit(fit, y_fit, stop, y_stop)
              for _ in range(2)]
    np.testing.assert_array_equal(capped[0].predict(held), capped[1].predict(held))   # seeded
    assert not np.array_equal(capped[0].predict(held), plain)
    assert np.isfinite(capped[0].predict(held)).all() and len(capped[0].attention(held)) == len(held.X)


def test_abmil_attention_finds_the_crop_that_carries_the_label():
    bags, y = make_bags(n_images=120, crops=4, signal_crops=1, seed=3)
    (fit, y_fit), (stop, y_stop), (held, _) = split(bags, y, 90, 15)
    s = ABMILSettings(hidden=16, attention=8, epochs=40, patience=8, batch_size=16)
    head = ABMILHead(s, 3, seed=0).fit(fit, y_fit, stop, y_stop)
    a = head.attention(held)
    assert a.shape == (len(held.X),)
    np.testing.assert_allclose(np.add.reduceat(a, held.starts[:-1]), 1.0, rtol=1e-5)
    # crop 0 of each bag carries the signal: it gets far more than its 1/4 share of attention
    assert a[bags.crop[held.source_row] == 0].mean() > 0.4


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)


def test_mlp_keeps_its_input_standardisation_in_the_weights_file(tmp_path):
    bags, y = make_bags()
    (fit, y_fit), (stop, y_stop), _ = split(bags, y)
    head = MLPHead(SMALL["mlp"], 3, seed=0).fit(fit, y_fit, stop, y_stop)
    head.save(tmp_path, ["a", "b", "c"])
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "mlp.safetensors"))
    np.testing.assert_allclose(tensors["input_mean"], fit.X.mean(0), rtol=1e-5, atol=1e-6)
    assert 1 <= head.best_epoch_ <= head.epochs_run_


def test_mlp_with_mixup_and_without_class_weights_trains():
    bags, y = make_bags(seed=1)
    (fit, y_fit), (stop, y_stop), (held, y_held) = split(bags, y)
    s = MLPSettings(hidden=16, depth=2, epochs=40, patience=40, batch_size=32, mixup_alpha=0.4, class_weights=False)
    head = MLPHead(s, 3, seed=0).fit(fit, y_fit, stop, y_stop)
    assert head.epochs_run_ == 40
    assert (held.per_image(head.predict(held)).argmax(1) == held.image_labels(y_held)).mean() > 0.6


def test_a_feature_dead_in_training_cannot_blow_up_held_out_logits():
    bags, y = make_bags(seed=2)
    bags.X[:, 0] = 0.0                      # a ReLU channel that never fires on the training folds ...
    (fit, y_fit), (stop, y_stop), (held, _) = split(bags, y)
    head = MLPHead(MLPSettings(hidden=16, epochs=10, patience=10, batch_size=32), 3, seed=0).fit(fit, y_fit, stop, y_stop)
    fired = held.select(held.images())
    fired.X[:, 0] = 0.5                     # ... and fires on a held-out image
    assert np.abs(head.predict(fired)).max() < 10 * np.abs(head.predict(held)).max()


def test_xgb_writes_booster_pca_and_settings_only(tmp_path):
    bags, y = make_bags(dim=20, seed=2)
    (fit, y_fit), (stop, y_stop), _ = split(bags, y)
    head = XGBHead(XGBSettings(n_estimators=40, pca_dims=6, early_stopping_rounds=5), 3, seed=0)
    head.fit(fit, y_fit, stop, y_stop)
    assert head.best_iteration_ < 40 and head.pca_components_.shape == (6, 20)
    head.save(tmp_path, ["a", "b", "c"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xgb.json", "xgb.ubj", PCA_FILE]
    assert json.loads((tmp_path / "xgb.json").read_text())["settings"]["pca_dims"] == 6


def test_pca_matches_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(3)
    X = rng.normal(size=(120, 10)) @ rng.normal(size=(10, 10))
    mean, comps = fit_pca(X, 4)
    ref = PCA(4).fit(X)
    np.testing.assert_allclose(mean, ref.mean_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.abs(comps), np.abs(ref.components_), atol=1e-4)


OUTCOME_SMALL = {**SMALL, "ridge": LogRegSettings(), "coxnet": None}


@pytest.mark.parametrize("name,task", sorted((n, t) for n, c in REGISTRY.items() for t in c.tasks
                                             if t != "classification"))
def test_outcome_head_contract(name, task, tmp_path):
    """Survival and regression heads: one output per bag, ordered (or valued) by the planted class, the
    same outputs after save / load (the objective read back from the head's file)."""
    from histoembed.maths.regression import r2
    from histoembed.maths.survival import harrell_c
    from histoembed.models.heads.objectives import Objective

    bags, cls = make_bags()
    rng = np.random.default_rng(0)
    if task == "survival":   # class 2 has the event soonest
        y = np.array([[8.0, 3.0, 1.0][c] for c in cls]) * np.exp(rng.normal(0, 0.3, len(cls))), \
            (rng.random(len(cls)) < 0.8)
        y = np.stack(y, axis=1).astype(np.float64)
    else:
        y = cls.astype(np.float64) * 2 + rng.normal(0, 0.3, len(cls))
    (fit, y_fit), (stop, y_stop), (held, y_held) = split(bags, y)
    head = REGISTRY[name](OUTCOME_SMALL[name], 3, seed=0, objective=Objective(task))
    z = head.fit(fit, y_fit, stop, y_stop).predict(held)
    assert z.shape == (held.n_bags, 1) and np.isfinite(z).all()
    per_image, truth = held.per_image(z)[:, 0], held.image_labels(y_held)
    if task == "survival":
        assert harrell_c(truth[:, 0], truth[:, 1], per_image) > 0.65
    else:
        assert r2(truth, per_image) > 0.3
    head.save(tmp_path, ["risk" if task == "survival" else "prediction"])
    loaded = REGISTRY[name].load(tmp_path)
    assert loaded.objective.task == task
    np.testing.assert_allclose(loaded.predict(held), z, rtol=1e-5, atol=1e-5)
