"""Shared fixtures: a CLI runner and a tiny Dinov2 saved like a real checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test downloads anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def cli(monkeypatch):
    """Run ``histoembed ARGS`` in-process from a folder; returns the click Result."""
    from histoembed.cli import app

    runner = CliRunner()

    def invoke(*args: str, cwd: Path | None = None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A Dinov2 of Phikon-v2's architecture, tiny, saved with save_pretrained (safetensors)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          image_size=32, patch_size=16)
    path = tmp_path_factory.mktemp("tiny-dinov2")
    Dinov2Model(config).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def pipeline_settings(tiny_dinov2):
    """Settings for a quick run through every stage with the tiny Dinov2."""
    from histoembed.core.config import Settings, override


    s = Settings()
    s.qc = override(s.qc, encoder=str(tiny_dinov2), workers=1)
    s.crops = override(s.crops, size=64, workers=1)
    s.embed = override(s.embed, encoder=str(tiny_dinov2), repeats=2, workers=0)
    s.fit = override(s.fit, folds=3, bootstrap=100)
    s.fit.mlp = override(s.fit.mlp, hidden=32, epochs=4, patience=2)
    s.fit.xgb = override(s.fit.xgb, n_estimators=15, pca_dims=16, early_stopping_rounds=5)
    return s


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, pipeline_settings) -> tuple[Path, Path]:
    """(data, run): a tiny synthetic dataset through qc, crops, embed, fit and submit, for tests that read a run.

    Test images are named img_0000.png on, like the training images (the real challenge's layout).
    """
    from histoembed.tools.demo import run_pipeline
    from histoembed.tools.synthetic import make_dataset

    root = tmp_path_factory.mktemp("pipeline")
    data, run = root / "data", root / "run"
    make_dataset(data, n_train=24, n_test=6, seed=1, outliers=True)
    run_pipeline(data, run, pipeline_settings, stages=("qc", "crops", "embed", "fit", "submit"))
    return data, run


def write_hub_model(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Files laid out as huggingface_hub writes its cache: blobs by sha256, a snapshot of links, refs/main."""
    import hashlib

    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(blob)


@pytest.fixture(scope="session")
def hub_layout():
    """``write_hub_model(cache, repo_id, files)``: put a model into a Hugging Face cache folder, offline."""
    return write_hub_model


@pytest.fixture(scope="session")
def crop_evidence(tmp_path_factory, tiny_dinov2):
    """``run(data_kind, name, *crop_options, fusion="crops") -> run folder`` and ``compare(a, b) -> dict``.

    The evidence for the crop options against planted problems (issue 15): 90 synthetic training images whose
    class shows as a colour tint a tiny random encoder sees, through the CLI (synth, crops, embed, fit with a
    linear probe on 5 folds, compare). Data kinds: ``clean`` (the tint inside the mask's blobs, where default
    crops look), ``context`` (a tinted ring around each blob, outside every default crop), ``partial`` (masks
    that mark a patch of tissue and miss the tinted rest). Each dataset and run is built once per session.
    """
    import json

    from typer.testing import CliRunner

    from histoembed.cli import app

    root = tmp_path_factory.mktemp("crop-evidence")
    runner = CliRunner()
    kinds = {"clean": ["--class-signal", "tumour"], "context": ["--class-signal", "context"],
             "partial": ["--class-signal", "tumour", "--partial-masks"]}
    built: dict[str, Path] = {}

    def cli(*args) -> str:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    def data(kind: str) -> Path:
        if kind not in built:
            built[kind] = root / f"data-{kind}"
            cli("synth", "--out", built[kind], "--train", 90, "--test", 2, "--seed", 7, "--no-outliers",
                "--min-size", 128, "--max-size", 192, *kinds[kind])
        return built[kind]

    def run(kind: str, name: str, *crop_options, fusion: str = "crops") -> Path:
        out = root / f"{kind}-{name}"
        if not (out / "metrics.json").exists():
            cli("crops", "--data", data(kind), "--run", out, "--size", 32, "--workers", 1, *crop_options)
            cli("embed", "--run", out, "--encoder", tiny_dinov2, "--repeats", 1, "--workers", 0, "--device", "cpu")
            cli("fit", "--run", out, "--folds", 5, "--bootstrap", 0, "--heads", "logreg", "--scale-fusion", fusion)
        return out

    def compare(a: Path, b: Path) -> dict:
        out = root / f"compare-{a.name}-{b.name}.json"
        cli("compare", a, b, "--bootstrap", 1000, "--json", out)
        return json.loads(out.read_text())

    return run, compare
