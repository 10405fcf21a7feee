"""Thread pools sized to the CPUs this process may use, and --threads."""

from __future__ import annotations

import subprocess
import sys

import torch

from histoembed.core import cpus
from histoembed.synthetic import write_synthetic_features


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
