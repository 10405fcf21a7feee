"""Survival and regression (issue 29): outcomes read from the data, `fit --task`, numbers checked against
scikit-survival and scikit-learn on the run's own out-of-fold file, a planted signal and a no-signal control."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.inputs.dataset import load_dataset
from histoembed.inputs.outcomes import read_outcomes
from histoembed.models import heads
from synthetic_inputs import write_synthetic_features

TOML = """
[fit]
bootstrap = 50
folds = 3
[fit.mlp]
hidden = 16
epochs = 6
patience = 2
[fit.xgb]
n_estimators = 20
pca_dims = 8
early_stopping_rounds = 5
[fit.abmil]
hidden = 16
attention = 8
epochs = 6
patience = 2
"""


def invoke(*args):
    from typer.testing import CliRunner

    from histoembed.cli import app
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def outcome_run(root: Path, signal: bool = True, n: int = 60, columns: str = "time,event,target") -> tuple[Path, Path]:
    """(run, config): synthetic features of two kinds of tissue (the planted property), a manifest whose times
    (kind 1: shorter) and targets (kind 1: higher) follow it, or with ``signal`` off are drawn regardless."""
    run = root / "run"
    write_synthetic_features(run, n_images=n, n_classes=2, n_test=4, signal=1.5)
    rng = np.random.default_rng(1)
    kind = np.arange(n) % 2 if signal else rng.integers(0, 2, n)
    lines = [f"image,mask,split,group,{columns}"]
    for i in range(n):
        t = rng.exponential(1.5 if kind[i] else 20.0) + 0.1
        values = {"time": f"{t:.3f}", "event": str(int(rng.random() < 0.75)),
                  "target": f"{2.0 * kind[i] + rng.normal(0, 0.5):.3f}"}
        lines.append(f"img_{i:04d}.png,,train,p{i // 2 if i < 10 else i}," + ",".join(values[c] for c in columns.split(",")))
    lines += [f"img_{i:04d}.png,,test,,,," for i in range(4)]
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    t = pq.read_table(run / store.CROPS_FILE)
    store.write_table(t, run / store.CROPS_FILE, meta={**store.read_meta(run / store.CROPS_FILE), "data": str(manifest)})
    config = root / "histoembed.toml"
    config.write_text(TOML)
    return run, config


# ---------------------------------------------------------------- outcomes in the data

def test_outcomes_named_by_row_skipped_or_strict(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "image,mask,split,time,event,target\n"
        "a.png,,train,5,1,1.5\nb.png,,train,,1,2\nc.png,,train,0,0,x\nd.png,,train,3,2,1\ne.png,,train,inf,1,nan\n"
        "f.png,,train,7,0,3\ng.png,,test,,,\n")
    got = read_outcomes(tmp_path / "manifest.csv", "survival")
    assert got.values == {"a.png": [5.0, 1.0], "f.png": [7.0, 0.0]}
    assert [s.split(":")[0] for s in got.skipped] == ["line 3 (b.png)", "line 4 (c.png)", "line 5 (d.png)",
                                                       "line 6 (e.png)"]
    assert "time is missing" in got.skipped[0] and "not positive" in got.skipped[1]
    assert "neither 1 (event) nor 0" in got.skipped[2] and "not a finite number" in got.skipped[3]
    reg = read_outcomes(tmp_path / "manifest.csv", "regression")
    assert set(reg.values) == {"a.png", "b.png", "d.png", "f.png"} and "'x' is not a finite number" in reg.skipped[0]
    with pytest.raises(UserError, match=r"line 3 \(b.png\): time is missing"):
        read_outcomes(tmp_path / "manifest.csv", "survival", strict=True)
    with pytest.raises(UserError, match="needs the column"):
        read_outcomes(tmp_path / "manifest.csv", "survival", time_column="os_months")


def test_a_listing_without_labels_lists_its_training_items(tmp_path):
    """A survival manifest (no label column) and a reference layout's train_labels.csv of outcomes keep their
    training items for crops; the fit reads the outcomes from the same files."""
    folder = tmp_path / "ref"
    for split in ("train", "test"):
        (folder / f"{split}_data").mkdir(parents=True)
    for i in range(3):
        _png(folder / "train_data" / f"img_{i}.png")
        _png(folder / "train_data" / f"mask_{i}.png", mask=True)
    (folder / "train_labels.csv").write_text("sample_index,os_days,dead\nimg_0.png,30,1\nimg_1.png,40,0\n"
                                             "img_2.png,50,1\n")
    ds = load_dataset(folder)
    assert sorted(s.image_id for s in ds.split("train")) == ["img_0.png", "img_1.png", "img_2.png"]
    assert all(s.label is None for s in ds.samples) and ds.classes == []
    got = read_outcomes(folder, "survival", time_column="os_days", event_column="dead")
    assert got.values["img_1.png"] == [40.0, 0.0]


def _png(path: Path, mask: bool = False) -> None:
    from PIL import Image

    arr = np.full((64, 64, 3), 200, np.uint8) if not mask else np.full((64, 64), 255, np.uint8)
    if not mask:
        arr[16:48, 16:48] = (150, 60, 140)
    Image.fromarray(arr).save(path)


def test_heads_declare_their_tasks():
    tasks = {name: cls.tasks for name, cls in heads.REGISTRY.items()}
    assert {n for n, t in tasks.items() if "survival" in t} == {"mlp", "xgb", "abmil", "coxnet"}
    assert {n for n, t in tasks.items() if "regression" in t} == {"mlp", "xgb", "abmil", "ridge"}
    assert tasks["logreg"] == ("classification",)


# ---------------------------------------------------------------- fit --task survival / regression

def test_fit_survival_planted_signal_matches_sksurv(tmp_path):
    from sksurv.metrics import concordance_index_censored

    run, config = outcome_run(tmp_path)
    result = invoke("fit", "--run", run, "--config", config, "--task", "survival",
                    "--heads", "mlp,xgb,coxnet,abmil")
    assert result.exit_code == 0, result.output
    assert "task: survival (--task survival)" in result.output and "C-index" in result.output
    oof = pq.read_table(run / store.OOF_FILE).to_pandas()
    assert {"image_id", "split", "fold", "time", "event", "risk", "risk_coxnet"} <= set(oof.columns)
    metrics = json.loads((run / store.METRICS_FILE).read_text())
    fused = metrics["heads"]["fused"]
    expected = concordance_index_censored(oof["event"].astype(bool), oof["time"], oof["risk"])[0]
    assert fused["harrell_c"]["value"] == pytest.approx(expected, abs=1e-9)
    assert fused["harrell_c"]["lo"] > 0.55 and fused["harrell_c"]["value"] > 0.65   # kind 1 dies sooner
    assert len(fused["time_auc"]["at"]) == 3 and fused["risk_halves"]["logrank_p"] < 0.05
    assert metrics["survival_at_horizon"]["groups"] and sum(metrics["fusion"]["weights"].values()) == pytest.approx(1)
    manifest = json.loads((run / "models" / "manifest.json").read_text())
    assert manifest["task"] == "survival" and manifest["classes"] == ["risk"]
    info = json.loads((run / "models" / "fold-00" / "xgb.json").read_text())
    assert info["task"] == "survival"
    ensemble = __import__("histoembed.models.inference", fromlist=["x"]).load_ensemble(run)
    train = ensemble.predict(__import__("histoembed.core.feature_store", fromlist=["x"]).read_features(
        ensemble_store(run), split="train"))
    assert np.isfinite(train.value).all() and len(train.value) == 60
    from histoembed.stages.report import render_report

    page = render_report(run)   # the survival numbers and KM halves in place of the classification sections
    assert "Survival (time to event)" in page and "log-rank p" in page and "C-index" in page
    assert "Cross-validated macro-F1" not in page and "data:image/png;base64" in page

    # no-signal control: times drawn regardless of the tissue; the interval holds 0.5
    control, config = outcome_run(tmp_path / "control", signal=False)
    result = invoke("fit", "--run", control, "--config", config, "--task", "survival", "--heads", "coxnet,xgb")
    assert result.exit_code == 0, result.output
    c = json.loads((control / store.METRICS_FILE).read_text())["heads"]["fused"]["harrell_c"]
    assert c["lo"] < 0.5 < c["hi"]

    result = invoke("fit", "--run", control, "--config", config, "--task", "survival", "--heads", "logreg")
    assert result.exit_code == 2 and "does not fit the survival task" in result.output

    # compare: the same items and times, one run fitted on the planted signal and one without
    shutil.copytree(run, tmp_path / "copy")
    result = invoke("compare", run, tmp_path / "copy", "--bootstrap", 200, "--json", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    same = json.loads((tmp_path / "c.json").read_text())
    assert same["metric"] == "C-index" and same["difference_b_minus_a"] == 0 and same["interval_95"] == [0, 0]
    result = invoke("compare", run, control)
    assert result.exit_code == 2 and "different time / event" in result.output


def test_survival_bags_streamed_from_the_store_give_the_in_memory_fit(tmp_path, monkeypatch):
    """A survival cohort too big for memory streams its bags (issue 37): the same out-of-fold risks."""
    from histoembed.core.feature_store import bags as slides

    run, config = outcome_run(tmp_path, n=30)
    other = tmp_path / "streamed"
    shutil.copytree(run, other)
    read, real = [], slides.SlideReader.read
    monkeypatch.setattr(slides.SlideReader, "read", lambda self, i: read.append(i) or real(self, i))
    for r, mode in ((run, "never"), (other, "always")):
        result = invoke("fit", "--run", r, "--config", config, "--task", "survival", "--heads", "coxnet,abmil,mlp",
                        "--stream", mode, "--bootstrap", 0)
        assert result.exit_code == 0, result.output
        assert bool(read) == (mode == "always")    # slide by slide only when streamed
    assert pq.read_table(run / store.OOF_FILE).equals(pq.read_table(other / store.OOF_FILE))


def test_fit_regression_from_the_columns_matches_sklearn(tmp_path):
    from sklearn.metrics import r2_score

    run, config = outcome_run(tmp_path, columns="target")
    crops = pq.read_table(run / store.CROPS_FILE)   # no labels: the columns give the task
    crops = crops.set_column(crops.schema.get_field_index("label"), "label",
                             __import__("pyarrow").nulls(len(crops), __import__("pyarrow").string()))
    store.write_table(crops, run / store.CROPS_FILE, meta=store.read_meta(run / store.CROPS_FILE))
    ray = invoke("fit", "--run", run, "--config", config, "--engine", "ray")
    assert ray.exit_code == 2 and "regression fits run in this process" in " ".join(ray.output.split())
    result = invoke("fit", "--run", run, "--config", config, "--heads", "ridge,xgb,mlp", "--regression-loss", "huber",
                    "--seeds", 2)
    assert result.exit_code == 0, result.output
    assert "fused: R² over seeds [0, 1]" in result.output
    assert "task: regression (no labels; the columns target of manifest.csv)" in result.output
    oof = pq.read_table(run / store.OOF_FILE).to_pandas()
    metrics = json.loads((run / store.METRICS_FILE).read_text())
    assert metrics["heads"]["fused"]["r2"]["value"] == pytest.approx(r2_score(oof["target"], oof["prediction"]))
    assert metrics["heads"]["ridge"]["r2"]["value"] == pytest.approx(r2_score(oof["target"], oof["prediction_ridge"]))
    assert metrics["heads"]["fused"]["r2"]["lo"] > 0.3
    inside = (oof["interval_low"] <= oof["target"]) & (oof["target"] <= oof["interval_high"])
    assert metrics["conformal"]["coverage"] == pytest.approx(inside.mean()) and inside.mean() > 0.7
    assert metrics["final"]["conformal_half_width"] > 0
    from histoembed.core import feature_store
    from histoembed.models.inference import load_ensemble
    from histoembed.stages.submit import _submit_outcome

    ensemble = load_ensemble(run)    # the test items' names repeat training ones here: no manifest lists both
    test_ids = [f"img_{i:04d}.png" for i in range(4)]
    pred = ensemble.predict(feature_store.read_features(ensemble_store(run), split="test"))
    _submit_outcome(run, ensemble, test_ids, pred, tta=True)
    rows = (run / store.SUBMISSION_FILE).read_text().splitlines()
    assert rows[0] == "sample_index,prediction" and len(rows) == 5
    test = pq.read_table(run / store.TEST_PREDICTIONS_FILE).to_pandas()
    width = test["interval_high"] - test["interval_low"]
    assert np.allclose(width, 2 * metrics["final"]["conformal_half_width"])
    from histoembed.stages.report import render_report

    page = render_report(run)
    assert "<h2" in page and "Regression" in page and "Conformal intervals" in page and "R²" in page


def ensemble_store(run: Path) -> Path:
    return next((run / store.FEATURES_DIR).iterdir())


def test_synth_survival_then_regression_through_every_stage(tmp_path, cli, pipeline_settings):
    """synth --task survival (images) -> qc, crops, embed, fit --task survival, submit, report; then a target
    column beside the times and the same crops and features fitted and submitted for regression."""
    from sksurv.metrics import concordance_index_censored

    from histoembed.core.config import override
    from histoembed.tools.demo import run_pipeline

    data, run = tmp_path / "data", tmp_path / "run"
    result = cli("synth", "--out", data, "--train", 24, "--test", 6, "--task", "survival", "--no-outliers",
                 "--min-size", 128, "--max-size", 160)
    assert result.exit_code == 0, result.output
    assert (data / "train_labels.csv").read_text().splitlines()[0] == "sample_index,time,event"
    planted = json.loads((data / "outcomes.json").read_text())
    settings = pipeline_settings.model_copy(deep=True)
    settings.fit = override(settings.fit, heads=("coxnet", "mlp"), bootstrap=50)
    run_pipeline(data, run, settings, stages=("qc", "crops", "embed", "fit", "submit", "report"))
    rows = (run / store.SUBMISSION_FILE).read_text().splitlines()
    assert rows[0] == "sample_index,risk" and len(rows) == 7
    oof = pq.read_table(run / store.OOF_FILE).to_pandas()
    metrics = json.loads((run / store.METRICS_FILE).read_text())
    assert metrics["task_from"].startswith("no labels; the columns time, event")
    c = concordance_index_censored(oof["event"].astype(bool), oof["time"], oof["risk"])[0]
    assert metrics["heads"]["fused"]["harrell_c"]["value"] == pytest.approx(c)
    assert "Survival (time to event)" in (run / store.REPORT_FILE).read_text()
    first = rows[1].split(",")
    result = cli("predict", "--run", run, first[0], "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "risk" in result.output and f"{float(first[1]):.3f}" in result.output   # the value submit wrote

    lines = (data / "train_labels.csv").read_text().splitlines()
    rng = np.random.default_rng(0)
    lines = [lines[0] + ",target"] + [f"{line},{planted['rank'][line.split(',')[0]] + rng.normal(0, 0.3):.3f}"
                                      for line in lines[1:]]
    (data / "train_labels.csv").write_text("\n".join(lines) + "\n")
    settings.fit = override(settings.fit, task="regression", heads=("ridge", "xgb"))
    run_pipeline(data, run, settings, stages=("fit", "submit"))
    assert (run / store.SUBMISSION_FILE).read_text().splitlines()[0] == "sample_index,prediction"
    assert json.loads((run / store.METRICS_FILE).read_text())["task"] == "regression"


def test_synth_outcomes_on_a_slide_manifest(tmp_path):
    """--slides writes a manifest: its labels become times and events (test rows empty), read back by the fit's
    reader; the control's ranks ignore the class."""
    from histoembed.tools.synthetic.outcomes import plant_outcomes

    rows = [f"slides/s{i}.svs,,{'benign' if i % 2 else 'malignant'},train,p{i}" for i in range(40)]
    rows += ["slides/t0.svs,,,test,q0"]
    (tmp_path / "manifest.csv").write_text("image,mask,label,split,group\n" + "\n".join(rows) + "\n")
    record = plant_outcomes(tmp_path, "survival", signal=True, seed=3)
    assert (tmp_path / "manifest.csv").read_text().splitlines()[0] == "image,mask,split,group,time,event"
    got = read_outcomes(tmp_path / "manifest.csv", "survival")
    assert len(got.values) == 40 and not got.skipped
    assert all(record["rank"][f"slides/s{i}.svs"] == (0 if i % 2 else 1) for i in range(40))
    (tmp_path / "manifest.csv").write_text("image,mask,label,split,group\n" + "\n".join(rows) + "\n")
    control = plant_outcomes(tmp_path, "regression", signal=False, seed=3)
    assert any(control["rank"][f"slides/s{i}.svs"] != (0 if i % 2 else 1) for i in range(40))
    assert len(read_outcomes(tmp_path / "manifest.csv", "regression").values) == 40
