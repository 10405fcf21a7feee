"""What the operating system refuses (full disk, read-only folder, a file for a folder) is a message, not a traceback.

A full or read-only disk cannot be made without privileges in a test, so the system call that
would fail (the rename that publishes a finished file) raises the error the kernel gives.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from histoembed.core import store
from synthetic_inputs import write_synthetic_features


def small_data(root: Path) -> Path:
    from histoembed.tools.synthetic import make_dataset

    make_dataset(root, n_train=6, n_test=2, seed=0, outliers=False, size_range=(160, 200))
    return root


@pytest.fixture
def failing_rename(monkeypatch):
    """``fail(code, under)``: renames onto a path under ``under`` raise OSError(code) from then on."""
    real = os.replace

    def fail(code: int, under: Path):
        def replace(src, dst, *a, **kw):
            if Path(dst).is_relative_to(under):
                raise OSError(code, os.strerror(code), str(dst))
            return real(src, dst, *a, **kw)
        monkeypatch.setattr(os, "replace", replace)

    return fail


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "no space left on the device"),
                                           (errno.EROFS, "cannot write or read here")])
def test_crops_on_a_full_or_read_only_disk(cli, tmp_path, failing_rename, code, message):
    data, run = small_data(tmp_path / "data"), tmp_path / "run"
    failing_rename(code, run)
    r = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1)
    assert r.exit_code == 2 and message in r.output and str(run / store.CROPS_FILE) in r.output
    assert "Traceback" not in r.output
    assert not run.exists() or not [p for p in run.iterdir()]  # nothing half-written is left


def test_embed_and_fit_on_a_full_disk(cli, tmp_path, failing_rename, tiny_dinov2):
    data, run = small_data(tmp_path / "data"), tmp_path / "run"
    assert cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1).exit_code == 0
    failing_rename(errno.ENOSPC, run / store.FEATURES_DIR)
    r = cli("embed", "--run", run, "--encoder", tiny_dinov2, "--workers", 0, "--repeats", 1)
    assert r.exit_code == 2 and "no space left on the device" in r.output and "finished files are kept" in r.output
    assert not list((run / store.FEATURES_DIR).rglob(".part-*"))

    synthetic = tmp_path / "fit-run"
    write_synthetic_features(synthetic, n_images=30, n_classes=3, dim=8)
    failing_rename(errno.ENOSPC, synthetic)
    r = cli("fit", "--run", synthetic, "--folds", 3, "--bootstrap", 0, "--mlp-epochs", 2, "--xgb-rounds", 3)
    assert r.exit_code == 2 and "no space left on the device" in r.output
    assert not (synthetic / store.MODELS_DIR).exists() and not (synthetic / store.METRICS_FILE).exists()
    assert not [p for p in synthetic.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("stage", ["crops", "fit", "submit", "report"])
def test_run_naming_a_file_is_refused(cli, tmp_path, stage):
    not_a_folder = tmp_path / "run.txt"
    not_a_folder.write_text("notes")
    r = cli(stage, "--run", not_a_folder)
    assert r.exit_code == 2 and "is a file" in " ".join(r.output.replace("│", " ").split())
    assert not_a_folder.read_text() == "notes"
