"""The README's commands as a user types them: the helpers of the runs that do that, and the console script.

A folder holds ``data/`` in the reference layout and a ``histoembed.toml`` (``small_settings_toml``) that points
the encoder at a tiny Dinov2 saved with ``save_pretrained`` (Phikon-v2 cannot be downloaded here) and keeps
the heads small. The commands are the ones of the README: ``histoembed qc``, ``histoembed crops``,
``histoembed embed --repeats 4``, ``histoembed fit --folds 10``, ``histoembed submit``. They run as real
processes (``python -m histoembed``) in ``test_fullscale.py``, on the reference challenge's size and naming,
and a second pass in-process there must find nothing to redo and give the same submission (one run of the
commands as processes serves both checks; each costs half a minute on two cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


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

[drift]
bootstrap = 100
"""


def _python_m(args: list[str], cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200", **env_vars}
    return subprocess.run([sys.executable, "-m", "histoembed", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("histoembed")
    assert script.exists(), "the `histoembed` console script is not installed (pip install -e .)"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for name in ("qc", "crops", "embed", "fit", "submit", "predict", "report", "demo"):
        assert name in done.stdout, f"command {name} missing from `histoembed --help`"
