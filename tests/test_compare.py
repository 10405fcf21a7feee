"""`histoembed compare`: paired bootstrap of two runs' out-of-fold macro-F1 over the same images."""

from __future__ import annotations

import json
import shutil

import pytest

from histoembed.tools import compare
from synthetic_inputs import write_synthetic_features
from histoembed.stages import fit
from histoembed.core.config import FitSettings, MLPSettings, XGBSettings
from histoembed.core.errors import UserError


def _settings(seed: int) -> FitSettings:
    return FitSettings(folds=3, seed=seed, bootstrap=0, mlp=MLPSettings(hidden=16, epochs=6, patience=2),
                       xgb=XGBSettings(n_estimators=15, pca_dims=8, early_stopping_rounds=5))


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """The same features fitted with seed 0 and seed 1: a change that should be noise."""
    root = tmp_path_factory.mktemp("compare")
    a, b = root / "a", root / "b"
    write_synthetic_features(a, n_images=90, n_classes=3, signal=0.6, seed=3)
    shutil.copytree(a, b)
    fit.run_fit(a, _settings(0))
    fit.run_fit(b, _settings(1))
    return a, b


def invoke(*args):
    from typer.testing import CliRunner

    from histoembed.cli import app
    return CliRunner().invoke(app, [str(x) for x in args], catch_exceptions=False)


def test_two_runs_differing_only_in_seed_give_an_interval_containing_zero(two_seeds, tmp_path):
    a, b = two_seeds
    out = tmp_path / "cmp.json"
    result = invoke("compare", a, b, "--bootstrap", 500, "--json", out)
    assert result.exit_code == 0, result.output
    assert "interval contains 0" in result.output and "Per fold of RUN_A" in result.output
    r = json.loads(out.read_text())
    lo, hi = r["interval_95"]
    assert lo <= 0 <= hi and lo < hi
    assert r["difference_b_minus_a"] == pytest.approx(r["macro_f1_b"] - r["macro_f1_a"])
    assert r["metric"] == "macro_f1" and r["resampled"] == "images"
    assert r["images"] == 90 and not r["same_folds"] and len(r["folds_of_run_a"]) == 3
    assert sum(f["images"] for f in r["folds_of_run_a"]) == 90


def test_a_run_against_itself_differs_by_exactly_zero(two_seeds):
    a, _ = two_seeds
    r = compare.run_compare(a, a, bootstrap=100)
    assert r.difference == 0 and r.interval == (0.0, 0.0) and r.same_folds
    assert all(f["difference"] == 0 for f in r.folds)
    offsets = compare.run_compare(a, a, bootstrap=50, decision="offsets")
    assert offsets.decision == "offsets" and offsets.difference == 0


def test_a_real_improvement_is_detected(two_seeds, tmp_path):
    """B's predictions replaced by the true labels: the interval lies above 0."""
    import pyarrow.parquet as pq

    from histoembed.core import store

    a, _ = two_seeds
    perfect = tmp_path / "perfect"
    shutil.copytree(a, perfect)
    table = pq.read_table(perfect / store.OOF_FILE)
    table = table.set_column(table.schema.get_field_index("prediction"), "prediction", table["label"])
    store.write_table(table, perfect / store.OOF_FILE, meta=store.read_meta(a / store.OOF_FILE))
    r = compare.run_compare(a, perfect, bootstrap=300)
    assert r.value_b == 1.0 and r.interval[0] > 0


def test_runs_over_different_training_images_are_refused(two_seeds, tmp_path):
    a, _ = two_seeds
    other = tmp_path / "other"
    write_synthetic_features(other, n_images=60, n_classes=3, seed=3)
    fit.run_fit(other, _settings(0))
    with pytest.raises(UserError, match="different training images"):
        compare.run_compare(a, other)
    result = invoke("compare", a, other)
    assert result.exit_code == 2 and "different training images" in result.output
    assert invoke("compare", a, tmp_path / "nothing").exit_code == 2
    bad = invoke("compare", a, a, "--decision", "best")
    assert bad.exit_code == 2 and "unknown decision" in bad.output


def test_compare_by_auroc_and_kappa_resamples_patients(two_seeds, tmp_path):
    """--metric auroc: both runs' fused probabilities on the same resampled patients (the crops' group column);
    the values are scikit-learn's; kappa needs the classes' order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    from histoembed.core import store

    a, b = two_seeds
    grouped = tmp_path / "grouped"
    shutil.copytree(a, grouped)
    crops = pq.read_table(grouped / store.CROPS_FILE)
    patient = [f"p{int(i[4:8]) // 2}" for i in crops["image_id"].to_pylist()]   # two images per patient
    store.write_table(crops.append_column("group", pa.array(patient, pa.string())), grouped / store.CROPS_FILE,
                      meta=store.read_meta(a / store.CROPS_FILE))
    out = tmp_path / "auroc.json"
    result = invoke("compare", grouped, b, "--metric", "auroc", "--bootstrap", 200, "--json", out)
    assert result.exit_code == 0, result.output
    assert "AUROC" in result.output and "45 patients" in result.output
    r = json.loads(out.read_text())
    assert r["resampled"] == "patients" and r["patients"] == 45 and r["metric"] == "auroc"
    oof = pq.read_table(a / store.OOF_FILE)
    classes = store.read_meta(a / store.OOF_FILE)["classes"]
    y = np.array([classes.index(c) for c in oof["label"].to_pylist()])
    probs = store.embedding_matrix(oof["prob"]).astype(np.float64)
    assert r["value_a"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-12)
    lo, hi = r["interval_95"]
    assert lo <= r["difference_b_minus_a"] <= hi
    refused = invoke("compare", a, b, "--metric", "kappa")
    assert refused.exit_code == 2 and "order of the classes" in refused.output
    kappa = compare.run_compare(a, b, bootstrap=50, metric="kappa", order=list(reversed(classes)))
    assert kappa.metric == "kappa" and -1 <= kappa.value_a <= 1 and kappa.unit == "images"
    nll = compare.run_compare(a, a, bootstrap=20, metric="nll")
    assert nll.difference == 0 and nll.lower_is_better
    assert invoke("compare", a, b, "--metric", "f2").exit_code == 2
