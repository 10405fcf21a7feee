"""The heads, temperature scaling and fusion as small units."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histoembed.config import MLPSettings, XGBSettings
from histoembed.heads.mlp import MLPHead, lr_factor
from histoembed.heads.xgb import PCA_FILE, XGBHead, fit_pca


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)


def _data(seed=0, n=120, dim=12):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    X = (rng.normal(size=(n, dim)) + 2 * np.eye(3, dim)[y]).astype(np.float32)
    return X, y


def test_mlp_learns_saves_and_loads_identically(tmp_path):
    X, y = _data()
    s = MLPSettings(hidden=16, epochs=30, patience=5, batch_size=32)
    head = MLPHead(s, 3, seed=0).fit(X[:90], y[:90], X[90:], y[90:], np.arange(30))
    assert (head.row_logits(X[90:]).argmax(1) == y[90:]).mean() > 0.7
    head.save(tmp_path, ["a", "b", "c"])
    loaded, info = MLPHead.load(tmp_path)
    np.testing.assert_array_equal(loaded.row_logits(X), head.row_logits(X))
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "mlp.safetensors"))
    np.testing.assert_allclose(tensors["input_mean"], X[:90].mean(0), rtol=1e-5, atol=1e-6)
    assert info["input_dim"] == 12 and info["classes"] == ["a", "b", "c"]
    assert MLPHead(s, 3, seed=0).fit(X[:90], y[:90], X[90:], y[90:], np.arange(30)).best_epoch_ == head.best_epoch_


def test_mlp_with_mixup_and_without_class_weights_trains():
    X, y = _data(1)
    s = MLPSettings(hidden=16, depth=2, epochs=40, patience=40, batch_size=32, mixup_alpha=0.4, class_weights=False)
    head = MLPHead(s, 3, seed=0).fit(X[:90], y[:90], X[90:], y[90:], np.arange(30))
    assert head.epochs_run_ == 40
    assert (head.row_logits(X[90:]).argmax(1) == y[90:]).mean() > 0.6


def test_a_feature_dead_in_training_cannot_blow_up_held_out_logits():
    X, y = _data(2)
    X[:, 0] = 0.0            # a ReLU channel that never fires on the training folds ...
    held_out = X[90:].copy()
    held_out[:, 0] = 0.5     # ... and fires on a held-out image
    s = MLPSettings(hidden=16, epochs=10, patience=10, batch_size=32)
    head = MLPHead(s, 3, seed=0).fit(X[:90], y[:90], X[90:], y[90:], np.arange(30))
    assert np.abs(head.row_logits(held_out)).max() < 10 * np.abs(head.row_logits(X[90:])).max()


def test_xgb_learns_saves_and_loads_identically_without_pickle(tmp_path):
    X, y = _data(2, dim=20)
    s = XGBSettings(n_estimators=40, pca_dims=6, early_stopping_rounds=5)
    head = XGBHead(s, 3, seed=0).fit(X[:90], y[:90], X[90:], y[90:])
    assert head.best_iteration_ < 40
    assert (head.logits(X[90:]).argmax(1) == y[90:]).mean() > 0.6
    head.save(tmp_path, ["a", "b", "c"], input_dim=20)
    loaded, info = XGBHead.load(tmp_path)
    np.testing.assert_allclose(loaded.logits(X), head.logits(X), rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xgb.json", "xgb.ubj", PCA_FILE]
    assert json.loads((tmp_path / "xgb.json").read_text())["settings"]["pca_dims"] == 6


def test_pca_matches_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    X, _ = _data(3, dim=10)
    mean, comps = fit_pca(X, 4)
    ref = PCA(4).fit(X)
    np.testing.assert_allclose(mean, ref.mean_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.abs(comps), np.abs(ref.components_), atol=1e-4)
