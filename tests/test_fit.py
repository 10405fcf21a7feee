"""`histoembed fit` on tiny generated feature stores: outputs, honesty, stability, QC, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss, precision_recall_fscore_support

from histoembed import fit, inference, store, synthetic
from histoembed.config import FitSettings, MLPSettings, XGBSettings
from histoembed.errors import UserError
from histoembed.heads import calibration, fusion, shared
from histoembed.heads.mlp import MLPHead
from histoembed.heads.xgb import XGBHead
from histoembed.metrics import softmax

TOML = """
[fit]
bootstrap = 100
[fit.mlp]
hidden = 32
epochs = 10
patience = 3
[fit.xgb]
n_estimators = 20
pca_dims = 8
early_stopping_rounds = 5
"""


def tiny_settings(**kw) -> FitSettings:
    return FitSettings(folds=3, bootstrap=100, mlp=MLPSettings(hidden=32, epochs=10, patience=3),
                       xgb=XGBSettings(n_estimators=20, pca_dims=8, early_stopping_rounds=5), **kw)


def make_run(root: Path, **kw) -> tuple[Path, Path]:
    """(run, config): 60 images x 2 crops x 2 views x 16-d, 3 classes, plus 5 test images."""
    run = root / "run"
    synthetic.write_synthetic_features(run, **{"n_images": 60, "n_classes": 3, "n_test": 5, **kw})
    config = root / "histoembed.toml"
    config.write_text(TOML)
    return run, config


def invoke(*args):
    from typer.testing import CliRunner

    from histoembed.cli import app
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def read_oof(run: Path):
    table = pq.read_table(run / store.OOF_FILE)
    lists = {c: np.stack(table[c].to_numpy(zero_copy_only=False)) for c in ("logits_mlp", "logits_xgb", "prob")}
    return table.to_pandas(), lists, store.read_meta(run / store.OOF_FILE)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    run, config = make_run(tmp_path_factory.mktemp("fitted"))
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
    assert result.exit_code == 0, result.output
    assert "macro-F1" in result.output and "fused" in result.output
    return run


# ---------------------------------------------------------------- outputs

def test_metrics_json_equals_sklearn_on_oof(fitted):
    oof, lists, meta = read_oof(fitted)
    metrics = json.loads((fitted / store.METRICS_FILE).read_text())
    classes = meta["classes"]
    assert classes == sorted(set(oof["label"])) == metrics["classes"]
    y = oof["label"].map(classes.index).to_numpy()
    predictions = {"mlp": lists["logits_mlp"].argmax(1), "xgb": lists["logits_xgb"].argmax(1),
                   "fused": oof["prediction"].map(classes.index).to_numpy()}
    for head, pred in predictions.items():
        m = metrics["heads"][head]
        assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert m["confusion"] == confusion_matrix(y, pred).tolist()
        p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(len(classes)), zero_division=0)
        for k, c in enumerate(classes):
            assert m["per_class"][c] == pytest.approx({"precision": p[k], "recall": r[k], "f1": f[k], "support": s[k]})
        per_fold = [f1_score(y[oof["fold"] == k], pred[oof["fold"] == k], average="macro") for k in range(3)]
        assert m["fold_mean"] == pytest.approx(np.mean(per_fold)) and m["fold_std"] == pytest.approx(np.std(per_fold))
        lo, hi = m["macro_f1_ci"]
        assert lo <= m["macro_f1"] <= hi
    assert metrics["heads"]["fused"]["nll"] == pytest.approx(log_loss(y, lists["prob"], labels=range(3)), rel=1e-5)
    assert (oof["prediction"] == [classes[i] for i in lists["prob"].argmax(1)]).all()


def test_oof_probabilities_use_the_fold_s_cross_fitted_temperatures_and_weight(fitted):
    oof, lists, _ = read_oof(fitted)
    calib = json.loads((fitted / store.CALIBRATION_FILE).read_text())
    per_fold = {p["fold"]: p for p in calib["folds"]}
    for k in range(3):
        rows = (oof["fold"] == k).to_numpy()
        p = per_fold[k]
        assert p["T_mlp"] > 0 and p["T_xgb"] > 0 and 0 <= p["w"] <= 1
        fused = fusion.fuse(lists["logits_mlp"][rows], lists["logits_xgb"][rows], p["w"], p["T_mlp"], p["T_xgb"])
        expected = softmax(fused)
        np.testing.assert_allclose(lists["prob"][rows], expected, atol=1e-6)
    assert set(calib["final"]) >= {"T_mlp", "T_xgb", "w"}


def test_models_folder_holds_every_fold_without_pickle(fitted):
    models = fitted / store.MODELS_DIR
    manifest = json.loads((models / store.MODELS_MANIFEST_FILE).read_text())
    assert manifest["folds"] == 3 and manifest["dim"] == 16 and manifest["encoder"] == "synthetic"
    assert manifest["classes"] == ["HER2(+)", "Luminal A", "Luminal B"]
    assert manifest["settings"]["mlp"]["hidden"] == 32 and manifest["feature_key"]
    for k in range(3):
        names = sorted(p.name for p in store.fold_dir(models, k).iterdir())
        assert names == ["mlp.json", "mlp.safetensors", "xgb.json", "xgb.ubj", "xgb_pca.safetensors"]
    for path in fitted.rglob("*"):
        if path.is_file():
            assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"
    assert not list(fitted.glob(".*tmp*")) and not list(models.glob(".*tmp*"))


def test_rerun_does_nothing_and_a_changed_setting_refits(tmp_path):
    run, config = make_run(tmp_path)
    assert invoke("fit", "--run", run, "--config", config, "--folds", 3).exit_code == 0
    stamp = (run / store.OOF_FILE).stat().st_mtime_ns
    again = invoke("fit", "--run", run, "--config", config, "--folds", 3)
    assert again.exit_code == 0 and "up to date" in again.output
    assert (run / store.OOF_FILE).stat().st_mtime_ns == stamp
    changed = invoke("fit", "--run", run, "--config", config, "--folds", 3, "--mlp-hidden", 8)
    assert changed.exit_code == 0 and "up to date" not in changed.output
    assert (run / store.OOF_FILE).stat().st_mtime_ns != stamp
    assert json.loads((store.fold_dir(run / "models", 0) / "mlp.json").read_text())["settings"]["hidden"] == 8


def test_cli_options_reach_the_models(tmp_path):
    run, config = make_run(tmp_path)
    result = invoke("fit", "--run", run, "--config", config, "--folds", 4, "--seed", 3, "--mlp-hidden", 8,
                    "--mlp-depth", 2, "--mlp-epochs", 3, "--mixup", 0.2, "--xgb-rounds", 7, "--pca-dims", 4,
                    "--bootstrap", 0)
    assert result.exit_code == 0, result.output
    manifest = json.loads((run / "models" / store.MODELS_MANIFEST_FILE).read_text())
    assert manifest["folds"] == 4 and manifest["seed"] == 3
    mlp = json.loads((store.fold_dir(run / "models", 3) / "mlp.json").read_text())
    xgb = json.loads((store.fold_dir(run / "models", 3) / "xgb.json").read_text())
    assert (mlp["settings"]["hidden"], mlp["settings"]["depth"], mlp["settings"]["epochs"],
            mlp["settings"]["mixup_alpha"]) == (8, 2, 3, 0.2)
    assert mlp["epochs_run"] <= 3
    assert (xgb["settings"]["n_estimators"], xgb["settings"]["pca_dims"]) == (7, 4) and xgb["best_iteration"] < 7
    metrics = json.loads((run / store.METRICS_FILE).read_text())
    assert metrics["heads"]["fused"]["macro_f1_ci"] is None


# ---------------------------------------------------------------- quality and honesty

def test_fused_macro_f1_is_at_least_each_head_s_within_noise(tmp_path):
    run = tmp_path / "run"
    synthetic.write_synthetic_features(run, n_images=150, n_classes=3, crops=3, views=2, dim=24, signal=1.0, seed=4)
    result = fit.run_fit(run, tiny_settings())
    heads = result.metrics["heads"]
    assert heads["fused"]["macro_f1"] > 0.6   # the signal is learnt
    assert heads["fused"]["macro_f1"] >= max(heads["mlp"]["macro_f1"], heads["xgb"]["macro_f1"]) - 0.05


def test_evaluation_fold_never_reaches_early_stopping_temperature_or_weight(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path)
    seen = {"mlp": [], "xgb": [], "T": [], "w": []}
    mlp_fit, xgb_fit = MLPHead.fit, XGBHead.fit
    fit_t, choose_w = calibration.fit_temperature, fusion.choose_weight

    def record_mlp(self, X, y, X_stop, y_stop, stop_image):
        seen["mlp"].append((np.array(X), np.array(X_stop)))
        return mlp_fit(self, X, y, X_stop, y_stop, stop_image)

    def record_xgb(self, X, y, X_stop, y_stop):
        seen["xgb"].append((np.array(X), np.array(X_stop)))
        return xgb_fit(self, X, y, X_stop, y_stop)

    def record_t(z, y):
        seen["T"].append(np.array(z))
        return fit_t(z, y)

    def record_w(z_mlp, z_xgb, y, t_mlp, t_xgb, points=21):
        seen["w"].append((np.array(z_mlp), np.array(z_xgb)))
        return choose_w(z_mlp, z_xgb, y, t_mlp, t_xgb, points)

    monkeypatch.setattr(MLPHead, "fit", record_mlp)
    monkeypatch.setattr(XGBHead, "fit", record_xgb)
    monkeypatch.setattr(calibration, "fit_temperature", record_t)
    monkeypatch.setattr(fusion, "choose_weight", record_w)
    fit.run_fit(run, tiny_settings())

    oof, lists, _ = read_oof(run)
    fold_of = dict(zip(oof["image_id"], oof["fold"]))
    features = store.read_features(store.find_feature_store(run), split="train")
    image_of_row = {row.tobytes(): i for row, i in zip(features.embedding, features.image_id)}
    _, row_image = shared.first_seen_index(features.image_id)
    means, pair_image = shared.view_means(features, row_image)
    ids, _ = shared.first_seen_index(features.image_id)
    image_of_pair = {row.tobytes(): ids[i] for row, i in zip(means, pair_image)}

    def images(rows, lookup):
        return {lookup[r.astype(np.float32).tobytes()] for r in rows}

    everyone = set(oof["image_id"])
    folds = oof["fold"].to_numpy()
    for k in range(3):
        evaluated = {i for i, f in fold_of.items() if f == k}
        for head, lookup in (("mlp", image_of_row), ("xgb", image_of_pair)):
            X, X_stop = seen[head][k]
            trained, stopped = images(X, lookup), images(X_stop, lookup)
            assert stopped and not stopped & trained
            assert not (trained | stopped) & evaluated
            assert trained | stopped == everyone - evaluated
        # T and w for fold k see exactly the other folds' OOF logits (in OOF row order)
        others = folds != k
        t_mlp, t_xgb = seen["T"][2 * k: 2 * k + 2]
        np.testing.assert_array_equal(t_mlp, lists["logits_mlp"][others])
        np.testing.assert_array_equal(t_xgb, lists["logits_xgb"][others])
        np.testing.assert_array_equal(seen["w"][k][0], lists["logits_mlp"][others])
        np.testing.assert_array_equal(seen["w"][k][1], lists["logits_xgb"][others])
    # then the final T and w (for the test set) on all OOF logits
    assert len(seen["T"]) == 8 and len(seen["w"]) == 4
    np.testing.assert_array_equal(seen["T"][6], lists["logits_mlp"])
    np.testing.assert_array_equal(seen["w"][3][1], lists["logits_xgb"])


def test_same_seed_gives_identical_metrics_json(tmp_path):
    run_a, _ = make_run(tmp_path / "a")
    run_b = tmp_path / "b" / "run"
    shutil.copytree(run_a, run_b)
    fit.run_fit(run_a, tiny_settings(seed=5))
    fit.run_fit(run_b, tiny_settings(seed=5))
    assert (run_a / store.METRICS_FILE).read_bytes() == (run_b / store.METRICS_FILE).read_bytes()
    assert (run_a / store.CALIBRATION_FILE).read_bytes() == (run_b / store.CALIBRATION_FILE).read_bytes()
    fit.run_fit(run_b, tiny_settings(seed=6))
    a, b = (json.loads((r / store.OOF_FILE).with_name(store.CALIBRATION_FILE).read_text()) for r in (run_a, run_b))
    assert a["folds"] != b["folds"]


def test_seeds_reports_the_spread_of_macro_f1(tmp_path):
    run, config = make_run(tmp_path)
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3, "--seeds", 2, "--seed", 1)
    assert result.exit_code == 0, result.output
    spread = json.loads((run / store.METRICS_FILE).read_text())["seeds"]
    assert spread["seeds"] == [1, 2]
    for head in ("mlp", "xgb", "fused"):
        scores = spread["macro_f1"][head]
        assert len(scores) == 2
        s = spread["spread"][head]
        assert s["max"] - s["min"] == pytest.approx(abs(scores[0] - scores[1])) and s["std"] >= 0
    assert "over seeds [1, 2]" in result.output
    # the kept models and OOF are those of the first seed
    heads = json.loads((run / store.METRICS_FILE).read_text())["heads"]
    assert spread["macro_f1"]["fused"][0] == heads["fused"]["macro_f1"]


def test_qc_flags_are_left_out_and_duplicate_groups_share_a_fold(tmp_path):
    run, config = make_run(tmp_path)
    ids = [f"img_{i:04d}.png" for i in range(60)]
    flagged = set(ids[:4])
    groups = {i: g for g, members in enumerate([ids[10:13], ids[20:24], ids[30:33], ids[40:42]]) for i in members}
    qc = pa.table({
        "image_id": ids, "split": ["train"] * 60, "flagged": [i in flagged for i in ids],
        "non_tissue": [i in flagged for i in ids], "ink": [False] * 60, "blank": [False] * 60,
        "outlier": [None] * 60, "duplicate_group": pa.array([groups.get(i) for i in ids], pa.int32()),
        "reason": ["planted" if i in flagged else "" for i in ids]}, schema=store.QC_SCHEMA)
    store.write_table(qc, run / store.QC_FILE, meta={"key": "qc-test"})

    result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
    assert result.exit_code == 0, result.output
    assert "4 flagged training image(s) left out" in result.output
    oof, _, _ = read_oof(run)
    assert not flagged & set(oof["image_id"]) and len(oof) == 56
    fold_of = dict(zip(oof["image_id"], oof["fold"]))
    for g in set(groups.values()):
        assert len({fold_of[i] for i, gg in groups.items() if gg == g}) == 1
    assert json.loads((run / store.METRICS_FILE).read_text())["excluded_flagged"] == 4

    kept = invoke("fit", "--run", run, "--config", config, "--folds", 3, "--include-flagged")
    assert kept.exit_code == 0 and "left out" not in kept.output
    assert len(read_oof(run)[0]) == 60


# ---------------------------------------------------------------- the ensemble

def test_ensemble_round_trip_reproduces_oof_and_predicts_new_features(fitted):
    ensemble = inference.load_ensemble(fitted)
    assert ensemble.classes == ["HER2(+)", "Luminal A", "Luminal B"] and ensemble.dim == 16
    calib = json.loads((fitted / store.CALIBRATION_FILE).read_text())
    oof, lists, _ = read_oof(fitted)
    features = store.read_features(store.find_feature_store(fitted), split="train")
    for k in range(3):   # fold k's saved heads with fold k's T and w give back the OOF probabilities
        p = calib["folds"][k]
        one = dataclasses.replace(ensemble, heads=[ensemble.heads[k]], t_mlp=p["T_mlp"], t_xgb=p["T_xgb"], w=p["w"])
        ids = set(oof["image_id"][oof["fold"] == k])
        pred = one.predict(features.subset(np.isin(features.image_id, list(ids))))
        expected = lists["prob"][[list(oof["image_id"]).index(i) for i in pred.image_ids]]
        np.testing.assert_allclose(pred.probs, expected, atol=1e-5)

    test = store.read_features(store.find_feature_store(fitted), split="test")
    pred = ensemble.predict(test)
    assert pred.image_ids == [f"img_{i:04d}.png" for i in range(60, 65)]
    np.testing.assert_allclose(pred.probs.sum(1), 1.0)
    crops = ensemble.predict_crops(test)
    assert crops.shape == (len(test), 3) and np.allclose(crops.sum(1), 1.0)

    wrong_dim = dataclasses.replace(test, embedding=np.zeros((len(test), 8), np.float32))
    with pytest.raises(UserError, match="8-d"):
        ensemble.predict(wrong_dim)
    with pytest.raises(UserError, match="encoder"):
        ensemble.predict(dataclasses.replace(test, meta={**test.meta, "encoder": "other"}))


def test_load_ensemble_refuses_missing_or_incomplete_models(tmp_path, fitted):
    with pytest.raises(UserError, match="manifest not found"):
        inference.load_ensemble(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    (store.fold_dir(run / "models", 1) / "xgb.ubj").unlink()
    with pytest.raises(UserError, match="model file missing"):
        inference.load_ensemble(run)
    shutil.rmtree(run)
    shutil.copytree(fitted, run)
    shutil.rmtree(store.fold_dir(run / "models", 2))
    with pytest.raises(UserError, match="fold 2 of 3 is missing"):
        inference.load_ensemble(run)


# ---------------------------------------------------------------- bad input

def test_clear_errors_without_features_or_labels(tmp_path):
    result = invoke("fit", "--run", tmp_path / "empty")
    assert result.exit_code == 2 and "no feature store found" in result.output and "histoembed embed" in result.output

    run, config = make_run(tmp_path)
    (run / store.CROPS_FILE).unlink()
    result = invoke("fit", "--run", run, "--config", config)
    assert result.exit_code == 2 and "crops.parquet" in result.output and "not found" in result.output

    run, config = make_run(tmp_path / "unlabelled")
    crops = pq.read_table(run / store.CROPS_FILE)
    crops = crops.set_column(crops.schema.get_field_index("label"), "label", pa.nulls(len(crops), pa.string()))
    store.write_table(crops, run / store.CROPS_FILE, meta={"key": "no-labels"})
    result = invoke("fit", "--run", run, "--config", config)
    assert result.exit_code == 2 and "no labelled training images" in result.output

    run, config = make_run(tmp_path / "few", n_images=12)
    result = invoke("fit", "--run", run, "--config", config, "--folds", 5)
    assert result.exit_code == 2 and "fewer than the 5 folds" in result.output and "--folds 4" in result.output


def test_encoder_picks_the_store_when_there_are_several(tmp_path):
    run, config = make_run(tmp_path)
    synthetic.write_synthetic_features(tmp_path / "other", n_images=60, n_classes=3, dim=8, encoder="other/enc")
    shutil.copytree(tmp_path / "other" / "features" / "other--enc", run / "features" / "other--enc")
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
    assert result.exit_code == 2 and "several feature stores" in result.output and "--encoder" in result.output
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3, "--encoder", "other/enc")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "models" / store.MODELS_MANIFEST_FILE).read_text())["dim"] == 8
