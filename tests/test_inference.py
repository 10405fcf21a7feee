"""Loading the fitted ensemble: damaged model files and fit outputs of two fits are refused with a message."""

from __future__ import annotations

import json
import shutil

import pytest

from histoembed.core import store


@pytest.mark.parametrize("name", ["mlp.safetensors", "xgb.ubj"])
def test_a_truncated_model_file_is_a_message_in_submit_and_report(pipeline_run, tmp_path, cli, name):
    data, run = pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = store.fold_dir(copy / store.MODELS_DIR, 0) / name
    path.write_bytes(path.read_bytes()[:100])
    r = cli("submit", "--data", data, "--run", copy)
    assert r.exit_code == 2, r.output
    assert "corrupt or changed since `histoembed fit` wrote them" in r.output and f"fold-00/{name}" in r.output
    assert "histoembed fit" in r.output
    r = cli("report", "--data", data, "--run", copy)      # the report says so where the models are drawn
    assert r.exit_code == 0, r.output
    assert "corrupt or changed" in (copy / store.REPORT_FILE).read_text()


def test_models_and_metrics_of_two_fits_are_refused(pipeline_run, tmp_path, cli):
    data, run = pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    metrics = json.loads((copy / store.METRICS_FILE).read_text())
    (copy / store.METRICS_FILE).write_text(json.dumps({**metrics, "key": "another-fit"}))
    for stage in ("submit", "report"):
        r = cli(stage, "--data", data, "--run", copy)
        assert r.exit_code == 2 and "metrics.json and models/ come from different fits" in r.output
