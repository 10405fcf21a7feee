"""Thread pools sized to the CPUs this process may use, and --threads."""

from __future__ import annotations

import subprocess
import sys

import torch

from histoembed.core import cpus
from synthetic_inputs import write_synthetic_features


def test_usable_cpus_follow_the_affinity_mask():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from histoembed.core.cpus import usable_cpus; print(usable_cpus())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_fit_threads_option_sizes_torch_and_xgboost(tmp_path, cli):
    before = torch.get_num_threads()
    try:
        run = tmp_path / "run"
        write_synthetic_features(run, n_images=30, n_classes=3, dim=8)
        r = cli("fit", "--run", run, "--folds", 3, "--bootstrap", 0, "--mlp-epochs", 2, "--xgb-rounds", 3,
                "--threads", 1)
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1 and cpus.threads() == 1
        again = cli("fit", "--run", run, "--folds", 3, "--bootstrap", 0, "--mlp-epochs", 2, "--xgb-rounds", 3)
        assert "up to date" in again.output                     # threads never change the results
        assert torch.get_num_threads() == cpus.usable_cpus()
    finally:
        torch.set_num_threads(before)


def test_openmp_threads_sleep_while_they_wait_unless_the_user_chose(tmp_path):
    """OMP_WAIT_POLICY=PASSIVE is in the environment before torch (and its libgomp) loads; a user's value stays."""
    import os
    import subprocess
    import sys

    code = ("import os, sys, histoembed; assert 'torch' not in sys.modules and 'xgboost' not in sys.modules; "
            "import torch; print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert default.stdout.strip() == "PASSIVE"
    chosen = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                            capture_output=True, text=True, cwd=tmp_path)
    assert chosen.stdout.strip() == "ACTIVE", chosen.stderr
