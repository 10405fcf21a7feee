"""All stages on a small synthetic dataset, through the command line, exactly as a user types them.

A folder holds ``data/`` in the reference layout and a ``histoembed.toml`` that points
the encoder at a tiny Dinov2 saved with ``save_pretrained`` (Phikon-v2 cannot be
downloaded here) and keeps the heads small. The commands are the ones of the README:
``histoembed qc``, ``histoembed crops``, ``histoembed embed --repeats 4``,
``histoembed fit --folds 10``, ``histoembed submit``. The first pass runs them as real
processes (``python -m histoembed``); a second pass in-process must find nothing to redo
and give the same submission.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from histoembed.core import feature_store, store

pytestmark = pytest.mark.slow

COMMANDS = [["qc"], ["crops"], ["embed", "--repeats", "4"], ["fit", "--folds", "10"], ["submit"]]


def small_settings_toml(encoder: Path, crop_size: int = 64) -> str:
    """Settings that keep every stage to seconds on two cores."""
    return f"""\
[qc]
encoder = "{encoder}"
workers = 1

[crops]
size = {crop_size}
workers = 1

[embed]
encoder = "{encoder}"
batch_size = 64
workers = 0

[fit]
bootstrap = 100

[fit.mlp]
hidden = 32
epochs = 4
patience = 2
batch_size = 128

[fit.xgb]
n_estimators = 15
pca_dims = 16
early_stopping_rounds = 5
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_dinov2) -> Path:
    from histoembed.tools.synthetic import make_dataset
    root = tmp_path_factory.mktemp("e2e")
    make_dataset(root / "data", n_train=100, n_test=8, seed=3, outliers=True)  # >= 10 images a class
    (root / "histoembed.toml").write_text(small_settings_toml(tiny_dinov2))
    return root


def _python_m(args: list[str], cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200", **env_vars}
    return subprocess.run([sys.executable, "-m", "histoembed", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_the_readme_commands_give_a_valid_submission(project, cli):
    for args in COMMANDS:
        done = _python_m(args, project)
        assert done.returncode == 0, f"histoembed {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"

    run = project / "run"
    for name in (store.CROPS_FILE, store.QC_FILE, store.OOF_FILE, store.METRICS_FILE,
                 store.CALIBRATION_FILE, store.TEST_PREDICTIONS_FILE):
        assert (run / name).exists(), name
    assert len(list((run / store.MODELS_DIR).glob("fold-*"))) == 10
    features = feature_store.read_features(feature_store.find_feature_store(run))
    assert set(features.view.tolist()) == {0, 1, 2, 3}

    rows = _read_csv(run / store.SUBMISSION_FILE)
    assert rows[0] == ["sample_index", "label"]
    test_ids = sorted(p.name for p in (project / "data" / "test_data").glob("img_*"))
    assert [r[0] for r in rows[1:]] == test_ids
    with (project / "data" / "train_labels.csv").open(newline="") as f:
        spellings = {row["label"] for row in csv.DictReader(f)}
    assert {r[1] for r in rows[1:]} <= spellings

    # Again, in-process: every stage finds its inputs and settings unchanged; same submission.
    before = (run / store.SUBMISSION_FILE).read_bytes()
    features_before = sorted(p.stat().st_mtime_ns for p in feature_store.feature_parts(feature_store.find_feature_store(run)))
    oof_before = (run / store.OOF_FILE).stat().st_mtime_ns
    for args in COMMANDS:
        result = cli(*args, cwd=project)
        assert result.exit_code == 0, result.output
    assert (run / store.SUBMISSION_FILE).read_bytes() == before
    assert sorted(p.stat().st_mtime_ns for p in feature_store.feature_parts(feature_store.find_feature_store(run))) \
        == features_before
    assert (run / store.OOF_FILE).stat().st_mtime_ns == oof_before


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("histoembed")
    assert script.exists(), "the `histoembed` console script is not installed (pip install -e .)"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for name in ("qc", "crops", "embed", "fit", "submit", "predict", "report", "demo"):
        assert name in done.stdout, f"command {name} missing from `histoembed --help`"
