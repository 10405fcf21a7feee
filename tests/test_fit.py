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

from histoembed.stages import fit
from synthetic_inputs import write_synthetic_features
from histoembed.tools import synthetic
from histoembed.core import feature_store, store
from histoembed.core.config import ABMILSettings, FitSettings, MLPSettings, XGBSettings
from histoembed.core.errors import UserError
from histoembed.maths.metrics import softmax
from histoembed.models import heads, inference
from histoembed.models.heads import calibration, conformal, fusion, offsets

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
[drift]
bootstrap = 100
"""
# [drift]: `histoembed fit` ends with the train-versus-test check (tests/test_drift.py tests it); its default
# 1000 bootstrap AUCs took 2 of the 3 s of each fit here, and no test of this file reads its interval.


def tiny_settings(**kw) -> FitSettings:
    return FitSettings(**{"folds": 3, "bootstrap": 100, "mlp": MLPSettings(hidden=32, epochs=10, patience=3),
                          "xgb": XGBSettings(n_estimators=20, pca_dims=8, early_stopping_rounds=5), **kw})


def make_run(root: Path, **kw) -> tuple[Path, Path]:
    """(run, config): 60 images x 2 crops x 2 views x 16-d, 3 classes, plus 5 test images."""
    run = root / "run"
    write_synthetic_features(run, **{"n_images": 60, "n_classes": 3, "n_test": 5, **kw})
    config = root / "histoembed.toml"
    config.write_text(TOML)
    return run, config


def invoke(*args):
    from typer.testing import CliRunner

    from histoembed.cli import app
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def read_oof(run: Path):
    table = pq.read_table(run / store.OOF_FILE)
    lists = {c: np.stack(table[c].to_numpy(zero_copy_only=False)) for c in table.column_names
             if c.startswith("logits_") or c == "prob"}
    return table.to_pandas(), lists, store.read_meta(run / store.OOF_FILE)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    run, config = make_run(tmp_path_factory.mktemp("fitted"))
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
    assert result.exit_code == 0, result.output
    assert "macro-F1" in result.output and "fused" in result.output
    return run


def fitted_copy(fitted: Path, root: Path) -> tuple[Path, Path]:
    """(run, config): a copy of the module's fitted run, for a test that changes it (a fit saved, not redone)."""
    shutil.copytree(fitted.parent, root / "copy")
    return root / "copy" / "run", root / "copy" / "histoembed.toml"


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


def test_oof_decisions_use_the_fold_s_cross_fitted_parameters(fitted):
    oof, lists, _ = read_oof(fitted)
    calib = json.loads((fitted / store.CALIBRATION_FILE).read_text())
    classes = calib["classes"]
    per_fold = {p["fold"]: p for p in calib["folds"]}
    for k in range(3):
        rows = (oof["fold"] == k).to_numpy()
        p = per_fold[k]
        assert p["heads"] == ["mlp", "xgb"] and all(t > 0 for t in p["T"].values())
        assert sum(p["weights"].values()) == pytest.approx(1) and min(p["weights"].values()) >= 0
        probs = softmax(fusion.fuse_members([lists["logits_mlp"][rows], lists["logits_xgb"][rows]],
                                            [p["weights"]["mlp"], p["weights"]["xgb"]],
                                            [p["T"]["mlp"], p["T"]["xgb"]]))
        np.testing.assert_allclose(lists["prob"][rows], probs, atol=1e-6)
        shifted = (np.log(probs) + np.array(p["offsets"])).argmax(1)
        assert list(oof["prediction_offsets"][rows]) == [classes[i] for i in shifted]
        q = np.array([np.inf if v is None else v for v in p["conformal_threshold"]])
        sets = [[c for c, inside in zip(classes, row) if inside] for row in (1 - probs) <= q + 1e-12]
        assert [list(v) for v in oof["set"][rows]] == sets
    assert set(calib["final"]) >= {"T", "T_note", "weights", "offsets", "conformal_threshold"}
    assert (oof["view_spread"] >= 0).all() and (oof["view_spread"] <= 1).all()


def test_metrics_report_offsets_beside_argmax_conformal_coverage_and_view_spread(fitted):
    metrics = json.loads((fitted / store.METRICS_FILE).read_text())
    oof, _, _ = read_oof(fitted)
    classes = metrics["classes"]
    y = oof["label"].map(classes.index).to_numpy()
    decision = metrics["decision"]
    assert decision["argmax"]["macro_f1"] == metrics["heads"]["fused"]["macro_f1"]
    shifted = oof["prediction_offsets"].map(classes.index).to_numpy()
    assert decision["offsets"]["macro_f1"] == pytest.approx(f1_score(y, shifted, average="macro"))
    better = decision["offsets"]["macro_f1"] > decision["argmax"]["macro_f1"]
    assert decision["submission_uses"] == ("offsets" if better else "argmax")   # --offsets auto
    conf = metrics["conformal"]
    covered = [label in set(s) for label, s in zip(oof["label"], oof["set"])]
    assert conf["coverage"] == pytest.approx(np.mean(covered)) and conf["alpha"] == 0.1
    assert conf["mean_set_size"] == pytest.approx(np.mean([len(s) for s in oof["set"]]))
    assert set(conf["coverage_per_class"]) == set(classes)
    bins = metrics["view_spread"]["accuracy_by_quantile"]
    assert sum(b["images"] for b in bins) == 60 and all(0 <= b["accuracy"] <= 1 for b in bins)
    for head in ("mlp", "xgb", "fused"):   # calibration is not worse than T = 1 beyond noise
        m = metrics["heads"][head]
        assert m["nll"] <= m["nll_before_calibration"] + 0.05


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


def test_rerun_does_nothing_and_a_changed_setting_refits(tmp_path, fitted):
    run, config = fitted_copy(fitted, tmp_path)
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


def test_heads_offsets_alpha_and_class_conditional_options_reach_the_outputs(tmp_path):
    run, config = make_run(tmp_path)
    config.write_text(TOML + "[fit.abmil]\nhidden = 8\nattention = 4\nepochs = 4\n")
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3, "--heads", "logreg,abmil,mlp",
                    "--offsets", "off", "--alpha", 0.2, "--class-conditional", "--bootstrap", 0)
    assert result.exit_code == 0, result.output
    assert "logreg" in result.output and "abmil" in result.output and "with class offsets" in result.output
    manifest = json.loads((run / "models" / store.MODELS_MANIFEST_FILE).read_text())
    assert manifest["heads"] == ["logreg", "abmil", "mlp"] and manifest["submission_uses"] == "argmax"
    assert sorted(p.name for p in store.fold_dir(run / "models", 0).iterdir()) == \
        ["abmil.json", "abmil.safetensors", "logreg.json", "logreg.safetensors", "mlp.json", "mlp.safetensors"]
    metrics = json.loads((run / store.METRICS_FILE).read_text())
    assert set(metrics["heads"]) == {"logreg", "abmil", "mlp", "fused"}
    assert metrics["conformal"]["alpha"] == 0.2 and metrics["conformal"]["class_conditional"]
    assert metrics["decision"]["offsets_setting"] == "off"
    calib = json.loads((run / store.CALIBRATION_FILE).read_text())
    assert len(set(calib["final"]["conformal_threshold"])) > 1   # one threshold per class
    oof, _, _ = read_oof(run)
    assert {"logits_logreg", "logits_abmil", "logits_mlp"} <= set(oof.columns) and "logits_xgb" not in oof.columns

    assert invoke("fit", "--run", run, "--config", config, "--folds", 3, "--heads", "mlp,svm").exit_code == 2
    bad = invoke("fit", "--run", run, "--config", config, "--folds", 3, "--offsets", "maybe")
    assert bad.exit_code == 2 and "--offsets" in bad.output
    on = invoke("fit", "--run", run, "--config", config, "--folds", 3, "--heads", "logreg", "--offsets", "on",
                "--bootstrap", 0)
    assert on.exit_code == 0, on.output
    assert json.loads((run / "models" / store.MODELS_MANIFEST_FILE).read_text())["submission_uses"] == "offsets"


def test_separable_features_keep_the_calibrated_nll_at_or_below_t_equal_one(tmp_path):
    """The issue's failure: strong features, separable OOF logits, T running to its bound."""
    run = tmp_path / "run"
    write_synthetic_features(run, n_images=48, n_classes=3, crops=2, views=2, dim=16, signal=4.0, seed=2)
    result = fit.run_fit(run, tiny_settings(bootstrap=0))
    for head in ("mlp", "xgb", "fused"):
        m = result.metrics["heads"][head]
        assert m["nll"] <= m["nll_before_calibration"] + 0.02, (head, m["nll"], m["nll_before_calibration"])
    calib = json.loads((run / store.CALIBRATION_FILE).read_text())
    for p in calib["folds"] + [calib["final"]]:
        assert all(0.05 < t < 50 for t in p["T"].values())   # never at the search bounds


def test_too_few_images_for_a_temperature_gives_t_1_and_says_so(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path, n_images=12)
    monkeypatch.setattr(calibration, "MIN_IMAGES", 10)   # the other folds hold 8 images: too few
    result = fit.run_fit(run, tiny_settings(folds=3, bootstrap=0))
    notes = result.metrics["calibration_notes"]
    assert any("fold 0, mlp: T = 1 because only 8 held-out images" in n for n in notes)
    calib = json.loads((run / store.CALIBRATION_FILE).read_text())
    assert calib["folds"][0]["T"]["mlp"] == 1.0 and "held-out images" in calib["folds"][0]["T_note"]["mlp"]


def test_on_a_dozen_images_calibration_never_raises_the_oof_nll_and_the_decision_is_reported(tmp_path):
    """Issue 35: per head and fused, T only where it lowers the NLL of images that did not choose it; the
    decision (T, applied or not, why) in metrics.json, calibration.json and fit's console table."""
    run, config = make_run(tmp_path, n_images=12, signal=4.0)
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
    assert result.exit_code == 0, result.output
    assert "calibration, mlp: T = " in result.output and "calibration, fused:" in result.output
    metrics = json.loads((run / store.METRICS_FILE).read_text())
    for head in ("mlp", "xgb", "fused"):
        m = metrics["heads"][head]
        assert m["nll"] <= m["nll_before_calibration"] + 1e-9, (head, m)
        decision = metrics["temperatures"][head]
        assert isinstance(decision["applied"], bool) and decision["why"]
    for head in ("mlp", "xgb"):
        decision = metrics["temperatures"][head]
        assert decision["T"] == (decision["fitted"] if decision["applied"] else 1.0)
        assert 0 <= decision["folds_applied"] <= decision["folds"] == 3
    calib = json.loads((run / store.CALIBRATION_FILE).read_text())
    for p in calib["folds"] + [calib["final"]]:
        assert set(p["T_applied"]) == set(p["T_why"]) == set(p["T_fitted"]) == {"mlp", "xgb"}
        assert all(p["T"][h] == 1.0 or p["T_applied"][h] for h in ("mlp", "xgb"))
    assert calib["final"]["fused_calibration"] == metrics["temperatures"]["fused"]


# ---------------------------------------------------------------- quality and honesty

def test_fused_macro_f1_is_at_least_each_head_s_within_noise(tmp_path):
    run = tmp_path / "run"
    write_synthetic_features(run, n_images=150, n_classes=3, crops=3, views=2, dim=24, signal=1.0, seed=4)
    result = fit.run_fit(run, tiny_settings())
    heads = result.metrics["heads"]
    assert heads["fused"]["macro_f1"] > 0.6   # the signal is learnt
    assert heads["fused"]["macro_f1"] >= max(heads["mlp"]["macro_f1"], heads["xgb"]["macro_f1"]) - 0.05


def test_evaluation_fold_never_reaches_training_stopping_temperature_weights_offsets_or_thresholds(
        tmp_path, monkeypatch):
    run, _ = make_run(tmp_path)
    names = ("mlp", "xgb", "logreg", "abmil")
    seen = {"fit": {h: [] for h in names}, "T": [], "w": [], "offsets": [], "conformal": []}

    def recorder(cls):
        original = cls.fit

        def record(self, bags, y, stop, y_stop):
            seen["fit"][cls.name].append((set(bags.image.tolist()), set(stop.image.tolist())))
            return original(self, bags, y, stop, y_stop)
        return record

    for h in names:
        monkeypatch.setattr(heads.REGISTRY[h], "fit", recorder(heads.REGISTRY[h]))
    choose_t, choose_w = calibration.choose_temperature, fusion.choose_weights
    choose_b, choose_q = offsets.choose_offsets, conformal.thresholds
    monkeypatch.setattr(calibration, "choose_temperature",
                        lambda z, y, *a: seen["T"].append((np.array(z), choose_t(z, y, *a))) or seen["T"][-1][1])
    monkeypatch.setattr(fusion, "choose_weights",
                        lambda z, y, t, p: seen["w"].append([np.array(m) for m in z]) or choose_w(z, y, t, p))
    monkeypatch.setattr(offsets, "choose_offsets", lambda L, y: seen["offsets"].append(len(y)) or choose_b(L, y))
    monkeypatch.setattr(conformal, "thresholds",
                        lambda p, y, a, c: seen["conformal"].append(len(y)) or choose_q(p, y, a, c))
    small = tiny_settings(heads=names, abmil=ABMILSettings(hidden=8, attention=4, epochs=3))
    fit.run_fit(run, small)

    oof, lists, _ = read_oof(run)
    folds = oof["fold"].to_numpy()
    everyone = set(range(60))
    calib = json.loads((run / store.CALIBRATION_FILE).read_text())
    # every temperature is fitted on whole folds' OOF logits: fold k's on the other folds, the nested check's
    # on the other folds but one, the final one on all; seen["T"] holds (logits, T) of each fit
    fitted_on = temperature_fits(seen["T"], lists, names, folds)
    w_rounds, q_rounds = seen["w"][-4:], (seen["offsets"][-4:], seen["conformal"][-4:])  # the pass that was kept
    for k in range(3):
        evaluated = set(np.flatnonzero(folds == k).tolist())
        for h in names:
            trained, stopped = seen["fit"][h][k]
            assert stopped and not stopped & trained
            assert not (trained | stopped) & evaluated
            assert trained | stopped == everyone - evaluated
        # fold k's temperatures, weights, offsets and thresholds see exactly the other folds' OOF logits
        others = folds != k
        for j, h in enumerate(names):
            p = calib["folds"][k]
            assert p["T"][h] == (fitted_on[h][frozenset([k])].value if p["T_applied"][h] else 1.0)
            np.testing.assert_array_equal(w_rounds[k][j], lists[f"logits_{h}"][others])
        assert q_rounds[0][k] == q_rounds[1][k] == others.sum()
    # then the final parameters (for the test set) on all OOF logits
    assert len(seen["w"]) % 4 == 0
    assert calib["final"]["T"]["mlp"] == (fitted_on["mlp"][frozenset()].value if calib["final"]["T_applied"]["mlp"]
                                          else 1.0)
    np.testing.assert_array_equal(w_rounds[3][3], lists["logits_abmil"])
    assert q_rounds[0][3] == q_rounds[1][3] == 60


def temperature_fits(seen: list, lists: dict, members, folds: np.ndarray) -> dict:
    """{member: {folds left out: the Temperature fitted}} of recorded (logits, Temperature) fits; each fit must be
    on whole folds' OOF logits (fold k's T on the other folds, its nested check's on the other folds but one)."""
    subsets = [[], [0], [1], [2], [0, 1], [0, 2], [1, 2]]
    out = {m: {} for m in members}
    for z, t in seen:
        m, left_out = next((m, frozenset(s)) for m in members for s in subsets
                           if np.array_equal(z, lists[f"logits_{m}"][~np.isin(folds, s)]))
        out[m][left_out] = t
    return out


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
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3, "--repeats-cv", 2, "--seed", 1)
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
    # --repeats-cv (eva's practice): every number's mean and spread over the repeats; the first repeat's intervals
    auroc = spread["metrics"]["fused"]["auroc"]
    assert auroc["values"][0] == heads["fused"]["auroc"]["value"] and auroc["repeats"] == 2
    assert auroc["mean"] == pytest.approx(np.mean(auroc["values"])) and auroc["std"] >= 0
    assert set(spread["metrics"]["mlp"]) >= {"macro_f1", "balanced_accuracy", "average_precision", "nll"}
    assert "fused over 2 repeats of the cross-validation" in result.output


def test_qc_flags_are_left_out_and_duplicate_groups_share_a_fold(tmp_path):
    run, config = make_run(tmp_path)
    ids = [f"img_{i:04d}.png" for i in range(60)]
    flagged = set(ids[:4])
    groups = {i: g for g, members in enumerate([ids[10:13], ids[20:24], ids[30:33], ids[40:42]]) for i in members}
    rows = [{"image_id": i, "split": "train", "flagged": i in flagged, "non_tissue": i in flagged, "ink": False,
             "blank": False, "duplicate_group": groups.get(i), "reason": "planted" if i in flagged else ""}
            for i in ids]
    # test images share the training names (img_0000.png ...): their flags and groups must not touch training
    rows += [{"image_id": f"img_{i:04d}.png", "split": "test", "flagged": True, "non_tissue": True, "ink": False,
              "blank": False, "duplicate_group": 99, "reason": "test"} for i in range(5, 10)]
    qc = pa.Table.from_pylist(rows, schema=store.QC_SCHEMA)
    store.write_table(qc, run / store.QC_FILE, meta={"key": "qc-test"})

    result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
    assert result.exit_code == 0, result.output
    assert "4 flagged training image(s) left out" in result.output
    oof, _, _ = read_oof(run)
    assert not flagged & set(oof["image_id"]) and len(oof) == 56
    assert set(oof["split"]) == {"train"}
    fold_of = dict(zip(oof["image_id"], oof["fold"]))
    for g in set(groups.values()):
        assert len({fold_of[i] for i, gg in groups.items() if gg == g}) == 1
    assert len({fold_of[f"img_{i:04d}.png"] for i in range(5, 10)}) > 1   # not one group with the test images
    assert json.loads((run / store.METRICS_FILE).read_text())["excluded_flagged"] == 4

    kept = invoke("fit", "--run", run, "--config", config, "--folds", 3, "--include-flagged")
    assert kept.exit_code == 0 and "left out" not in kept.output
    assert len(read_oof(run)[0]) == 60


def write_flags(run: Path, flagged: set[str], n: int = 60) -> None:
    ids = [f"img_{i:04d}.png" for i in range(n)]
    qc = pa.table({
        "image_id": ids, "split": ["train"] * n, "flagged": [i in flagged for i in ids],
        "non_tissue": [i in flagged for i in ids], "ink": [False] * n, "blank": [False] * n,
        "outlier": [None] * n, "duplicate_group": pa.array([None] * n, pa.int32()),
        "mask_twin": [None] * n, "near_train": [None] * n, "near_train_hash_distance": [None] * n,
        "near_train_cosine": [None] * n,
        "reason": ["planted" if i in flagged else "" for i in ids]}, schema=store.QC_SCHEMA)
    store.write_table(qc, run / store.QC_FILE, meta={"key": "qc-test"})


def test_no_class_disappears_when_qc_flags_its_images(tmp_path):
    run, config = make_run(tmp_path)                          # image i has class i % 3; class 2 is Luminal B
    write_flags(run, {f"img_{i:04d}.png" for i in range(2, 60, 3)})
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
    assert result.exit_code == 2, result.output
    assert "label 'Luminal B' has no training image left" in result.output and "QC flagged all 20" in result.output
    assert "--include-flagged" in result.output and not (run / store.METRICS_FILE).exists()

    write_flags(run, {f"img_{i:04d}.png" for i in range(2, 50, 3)})   # 4 Luminal B images left for 5 folds
    result = invoke("fit", "--run", run, "--config", config, "--folds", 5)
    assert result.exit_code == 2 and "'Luminal B' has 4 training image(s), fewer than the 5 folds" in result.output
    assert "16 more were flagged by QC" in result.output and "--include-flagged" in result.output


def crops_used_qc(run: Path, key: str | None) -> None:
    """Record in crops.parquet the QC table (its key) crops left images out by, as ``histoembed crops`` does."""
    crops = run / store.CROPS_FILE
    meta = {**store.read_meta(crops), "qc": key}
    pq.write_table(pq.read_table(crops).replace_schema_metadata({store.META_KEY: json.dumps(meta).encode()}), crops)


def test_fit_refuses_flags_of_a_qc_table_crops_did_not_use(tmp_path):
    """Issue 23: fit reads flags and duplicate groups from run/qc.parquet; they must be the ones the crops were
    cut by, else (QC re-run on changed data, or removed) it stops and says to run qc, then crops."""
    run, config = make_run(tmp_path)
    crops_used_qc(run, "qc-before-the-data-changed")
    write_flags(run, set())                                      # key "qc-test": another QC run
    cases = [("this QC table is not the one `histoembed crops` used", None),
             ("`histoembed crops` used a QC table that is gone", lambda: (run / store.QC_FILE).unlink()),
             ("this QC table was written after `histoembed crops` cut the crops without one",
              lambda: (crops_used_qc(run, None), write_flags(run, set())))]
    for why, change in cases:
        if change:
            change()
        result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
        assert result.exit_code == 2, result.output
        assert f"{run / store.QC_FILE}: {why}" in result.output
        assert "run `histoembed qc`, then `histoembed crops`" in result.output
        assert not (run / store.METRICS_FILE).exists()
    crops_used_qc(run, "qc-test")                                # the table crops used: fit goes on
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- the ensemble

def test_ensemble_round_trip_reproduces_oof_and_predicts_new_features(fitted):
    ensemble = inference.load_ensemble(fitted)
    assert ensemble.classes == ["HER2(+)", "Luminal A", "Luminal B"] and ensemble.dim == 16
    calib = json.loads((fitted / store.CALIBRATION_FILE).read_text())
    oof, lists, _ = read_oof(fitted)
    features = feature_store.read_features(feature_store.find_feature_store(fitted), split="train")
    for k in range(3):   # fold k's saved heads with fold k's parameters give back the OOF decisions
        one = dataclasses.replace(ensemble, models=[ensemble.models[k]], final=calib["folds"][k], use_offsets=True)
        ids = set(oof["image_id"][oof["fold"] == k])
        pred = one.predict(features.subset(np.isin(features.image_id, list(ids))))
        rows = [list(oof["image_id"]).index(i) for i in pred.image_ids]
        np.testing.assert_allclose(pred.probs, lists["prob"][rows], atol=1e-5)
        assert [ensemble.classes[i] for i in pred.pred] == list(oof["prediction_offsets"].iloc[rows])
        assert [[c for c, s in zip(ensemble.classes, row) if s] for row in pred.sets] == \
            [list(v) for v in oof["set"].iloc[rows]]
        np.testing.assert_allclose(pred.view_spread, oof["view_spread"].iloc[rows], atol=1e-5)

    test = feature_store.read_features(feature_store.find_feature_store(fitted), split="test")
    pred = ensemble.predict(test)
    # the test split reuses the training names (img_0000.png ...): predictions keep the split
    assert pred.keys() == [("test", f"img_{i:04d}.png") for i in range(5)]
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
    write_synthetic_features(tmp_path / "other", n_images=60, n_classes=3, n_test=5, dim=8,
                                       encoder="other/enc")  # the same crops, another encoder
    shutil.copytree(tmp_path / "other" / "features" / "other--enc", run / "features" / "other--enc")
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
    assert result.exit_code == 2 and "several feature stores" in result.output and "--encoder" in result.output
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3, "--encoder", "other/enc")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "models" / store.MODELS_MANIFEST_FILE).read_text())["dim"] == 8


@pytest.mark.parametrize("seed", range(6))
def test_group_folds_are_scikit_learns_stratified_group_kfold(seed):
    """The fast fold assignment gives exactly scikit-learn's StratifiedGroupKFold(shuffle=True) folds."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 700))
    y = rng.choice(4, size=n, p=[0.27, 0.3, 0.32, 0.11])
    groups = np.arange(n)
    dup = rng.choice(n, size=n // 10, replace=False)          # some images share a duplicate group
    groups[dup] = rng.integers(0, n // 20 + 1, size=len(dup))
    for n_splits in (2, 5, 10):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            theirs = list(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(y, y, groups))
        ours = fit._group_kfold(y, groups, n_splits, seed)
        assert len(ours) == n_splits
        for (tr_a, te_a), (tr_b, te_b) in zip(ours, theirs):
            np.testing.assert_array_equal(te_a, te_b)
            np.testing.assert_array_equal(tr_a, tr_b)


# ---------------------------------------------------------------- damage and killed runs

def test_a_corrupt_model_file_makes_fit_repair_rather_than_skip(tmp_path, fitted):
    run, config = fitted_copy(fitted, tmp_path)
    for name in ("mlp.safetensors", "xgb.ubj"):
        path = store.fold_dir(run / store.MODELS_DIR, 1) / name
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 2])                   # a truncated file
        again = invoke("fit", "--run", run, "--config", config, "--folds", 3)
        assert again.exit_code == 0 and "up to date" not in again.output
        assert path.read_bytes() == good                           # the same seed writes the same model
        assert "up to date" in invoke("fit", "--run", run, "--config", config, "--folds", 3).output


def test_a_fit_killed_between_renames_is_recovered_and_its_leftovers_removed(tmp_path, fitted):
    run, config = fitted_copy(fitted, tmp_path)
    models = run / store.MODELS_DIR
    before = store.model_files(models)
    # What `kill -9` leaves between moving models/ aside and renaming the new one in: no models/ at all.
    dead = 999_999_999
    models.rename(run / f".{store.MODELS_DIR}.old-{dead}")
    (run / f".{store.MODELS_DIR}.tmp-{dead}").mkdir()
    (run / f".{store.OOF_FILE}.tmp-{dead}").write_bytes(b"half a file")
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
    assert result.exit_code == 0 and "up to date" in result.output   # the old, consistent set is back
    assert store.model_files(models) == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------- full disk (issue 23, 4a)

ENOSPC_TEXT = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("."))


def test_a_full_disk_while_saving_a_head_names_the_file_and_keeps_the_previous_fit(tmp_path, fitted, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    run, config = fitted_copy(fitted, tmp_path)
    before = store.model_files(run / store.MODELS_DIR)
    metrics_before = (run / store.METRICS_FILE).read_bytes()

    def full(*a, **k):
        raise SafetensorError(ENOSPC_TEXT)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3, "--seed", 7)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "no space left" in text and "mlp.safetensors" in text and "fold-00" in text
    assert "free space" in text and "re-run `histoembed fit`" in text
    assert leftovers(run) == []                                          # no temporary left behind
    assert store.model_files(run / store.MODELS_DIR) == before           # the previous, whole fit is untouched
    assert (run / store.METRICS_FILE).read_bytes() == metrics_before
    inference.load_ensemble(run)                                         # ... and still one consistent set


def test_a_fit_failing_after_models_is_renamed_in_leaves_no_models_that_submit_accepts(tmp_path, monkeypatch):
    import errno
    import os

    run, config = make_run(tmp_path)
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == store.CALIBRATION_FILE:                   # the first rename after models/
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
    monkeypatch.setattr(os, "replace", real)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert store.CALIBRATION_FILE in text and "free space" in text and "re-run `histoembed fit`" in text
    assert not (run / store.MODELS_DIR).exists() and leftovers(run) == []
    with pytest.raises(UserError, match="run `histoembed fit` first"):
        inference.load_ensemble(run)                                   # what submit reads: refused
    assert invoke("fit", "--run", run, "--config", config, "--folds", 3).exit_code == 0
    inference.load_ensemble(run)


# ---------------------------------------------------------------- one fit per run (issue 23, 5)

def test_a_second_fit_of_the_same_run_is_refused_with_the_holder_s_pid_and_a_dead_one_s_lock_is_taken(tmp_path):
    import subprocess
    import sys

    run, config = make_run(tmp_path)
    lock = run / fit.FIT_LOCK
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a fit still running
    try:
        lock.write_text(str(other.pid))
        result = invoke("fit", "--run", run, "--config", config, "--folds", 3)
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert f"process {other.pid}" in text and fit.FIT_LOCK in text and "Traceback" not in text
        assert not (run / store.MODELS_DIR).exists() and lock.read_text() == str(other.pid)
    finally:
        other.kill()
        other.wait()
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3)   # its process is gone: taken over
    assert result.exit_code == 0, result.output
    assert (run / store.MODELS_DIR).is_dir() and not lock.exists() and leftovers(run) == []


def test_with_two_encoders_no_oof_prediction_helps_choose_a_weight_or_temperature_applied_to_it(tmp_path, monkeypatch):
    """The leakage test above, with (encoder, head) members: fold k's heads of *both* encoders never train or
    stop on fold k, and fold k's temperatures and fusion weights see exactly the other folds' OOF logits of
    every member (both encoders'), never fold k's."""
    run, _ = make_run(tmp_path)
    write_synthetic_features(tmp_path / "other", n_images=60, n_classes=3, n_test=5, dim=8,
                                       encoder="other/enc", feature_seed=5)  # the same crops, another encoder
    shutil.copytree(tmp_path / "other" / "features" / "other--enc", run / "features" / "other--enc")
    seen = {"fit": [], "T": [], "w": []}
    names = ("mlp", "logreg")
    for h in names:
        original = heads.REGISTRY[h].fit

        def record(self, bags, y, stop, y_stop, original=original):
            seen["fit"].append((bags.X.shape[1], set(bags.image.tolist()), set(stop.image.tolist())))
            return original(self, bags, y, stop, y_stop)
        monkeypatch.setattr(heads.REGISTRY[h], "fit", record)
    choose_t, choose_w = calibration.choose_temperature, fusion.choose_weights
    monkeypatch.setattr(calibration, "choose_temperature",
                        lambda z, y, *a: seen["T"].append((np.array(z), choose_t(z, y, *a))) or seen["T"][-1][1])
    monkeypatch.setattr(fusion, "choose_weights",
                        lambda z, y, t, p, **kw: seen["w"].append([np.array(m) for m in z]) or choose_w(z, y, t, p, **kw))
    fit.run_fit(run, tiny_settings(heads=names), encoder="synthetic,other/enc")

    oof, lists, meta = read_oof(run)
    members = ["synthetic:mlp", "synthetic:logreg", "other--enc:mlp", "other--enc:logreg"]
    assert meta["heads"] == members
    folds = oof["fold"].to_numpy()
    everyone = set(range(60))
    # the heads: encoder synthetic (16-d) fold by fold, then other/enc (8-d), on the same folds
    assert [d for d, _, _ in seen["fit"]] == [16] * 6 + [8] * 6
    for j, (_, trained, stopped) in enumerate(seen["fit"]):
        evaluated = set(np.flatnonzero(folds == (j % 6) // 2).tolist())
        assert stopped and not stopped & trained and not (trained | stopped) & evaluated
        assert trained | stopped == everyone - evaluated
        assert (trained, stopped) == seen["fit"][(j + 6) % 12][1:]   # the other encoder: the same images
    calib = json.loads((run / store.CALIBRATION_FILE).read_text())
    fitted_on = temperature_fits(seen["T"], lists, members, folds)
    w_rounds = seen["w"][-4:]   # the pass that was kept
    for k in range(3):
        others = folds != k
        for j, m in enumerate(members):
            p = calib["folds"][k]
            assert p["T"][m] == (fitted_on[m][frozenset([k])].value if p["T_applied"][m] else 1.0)
            np.testing.assert_array_equal(w_rounds[k][j], lists[f"logits_{m}"][others])
    assert len(seen["w"]) % 4 == 0
    np.testing.assert_array_equal(w_rounds[3][2], lists["logits_other--enc:mlp"])


# ---------------------------------------------------------------- the field's numbers (issue 34)

def with_patients(run: Path, per_patient: int = 2) -> None:
    """Give the run's crops table a ``group`` column: ``per_patient`` consecutive training images per patient."""
    crops = pq.read_table(run / store.CROPS_FILE)
    patient = [f"p{int(i[4:8]) // per_patient}" if sp == "train" else None
               for i, sp in zip(crops["image_id"].to_pylist(), crops["split"].to_pylist())]
    store.write_table(crops.append_column("group", pa.array(patient, pa.string())), run / store.CROPS_FILE,
                      meta=store.read_meta(run / store.CROPS_FILE))


def test_field_numbers_over_patients_equal_sklearn_on_oof(tmp_path):
    """AUROC, AP, balanced accuracy and (with an order) kappa of every head and the fusion, each scikit-learn's value
    on oof.parquet (the heads' probabilities rebuilt from their logits and calibration.json, as the report does),
    each with an interval that resamples patients; --select-by chooses the weights and offsets by its metric."""
    from sklearn.metrics import (average_precision_score, balanced_accuracy_score, cohen_kappa_score,
                                 roc_auc_score)

    from histoembed.models.heads import decisions

    run, config = make_run(tmp_path, n_images=72, n_classes=4)
    with_patients(run)
    bad = invoke("fit", "--run", run, "--config", config, "--class-order", "a,b")
    assert bad.exit_code == 2 and "class_order" in bad.output and "each training class once" in bad.output
    labels = synthetic.LABELS[:4]
    order = [labels[2], labels[0], labels[3], labels[1]]          # grades that differ from the label order
    result = invoke("fit", "--run", run, "--config", config, "--folds", 3, "--class-order", ",".join(order),
                    "--select-by", "balanced_accuracy", "--bootstrap", 60)
    assert result.exit_code == 0, result.output
    assert "36 patients" in result.output and "kappa" in result.output
    metrics = json.loads((run / store.METRICS_FILE).read_text())
    oof, lists, meta = read_oof(run)
    calib = json.loads((run / store.CALIBRATION_FILE).read_text())
    classes = meta["classes"]
    y = oof["label"].map(classes.index).to_numpy()
    assert list(oof["group"]) == [f"p{int(i[4:8]) // 2}" for i in oof["image_id"]]
    assert metrics["intervals"]["unit"] == "patients" and metrics["intervals"]["patients"] == 36
    assert metrics["class_order"] == order and metrics["select_by"] == "balanced_accuracy"
    assert calib["final"]["selected_by"] == "balanced_accuracy"
    probs = decisions.calibrated_probabilities({h: lists[f"logits_{h}"] for h in calib["heads"]},
                                               oof["fold"].to_numpy(), calib["folds"])
    np.testing.assert_allclose(probs["fused"][1], lists["prob"], atol=1e-6)
    ranks = np.array([order.index(c) for c in classes])
    for head, (_, p) in probs.items():
        m = metrics["heads"][head]
        pred = p.argmax(1)
        assert m["auroc"]["value"] == roc_auc_score(y, p, multi_class="ovr")
        assert m["average_precision"]["value"] == pytest.approx(
            np.mean([average_precision_score(y == k, p[:, k]) for k in range(4)]), abs=1e-15)
        assert m["balanced_accuracy"]["value"] == balanced_accuracy_score(y, pred)
        assert m["quadratic_kappa"]["value"] == cohen_kappa_score(ranks[y], ranks[pred], weights="quadratic",
                                                                  labels=range(4))
        for k, c in enumerate(classes):
            assert m["auroc_per_class"][c]["value"] == roc_auc_score(y == k, p[:, k])
        for name in ("auroc", "balanced_accuracy", "quadratic_kappa"):
            assert m[name]["unit"] == "patients" and m[name]["lo"] <= m[name]["hi"]
    offsets = oof["prediction_offsets"].map(classes.index).to_numpy()
    decided = metrics["decision"]["offsets"]
    assert decided["balanced_accuracy"]["value"] == balanced_accuracy_score(y, offsets)
    assert metrics["decision"]["offsets_compared_by"] == "balanced_accuracy"
    assert metrics["heads"]["fused"]["auroc"]["value"] == pytest.approx(
        roc_auc_score(y, lists["prob"] / lists["prob"].sum(1, keepdims=True), multi_class="ovr"), abs=1e-6)
    json.dumps(metrics, allow_nan=False)


def test_select_by_kappa_needs_an_order_and_ordinal_takes_label_order(tmp_path):
    run, config = make_run(tmp_path)
    refused = invoke("fit", "--run", run, "--config", config, "--select-by", "kappa")
    assert refused.exit_code == 2 and "needs the order of the classes" in refused.output
    s = tiny_settings(ordinal=True, bootstrap=0, select_by="kappa")
    metrics = fit.run_fit(run, s).metrics
    assert metrics["class_order"] == metrics["classes"] and metrics["intervals"]["unit"] == "images"
    assert metrics["heads"]["fused"]["quadratic_kappa"]["lo"] is None        # --bootstrap 0: values only
    assert fit.task.class_order(["G10", "G2", "G1"], FitSettings(ordinal=True)) == ["G1", "G2", "G10"]
