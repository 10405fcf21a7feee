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
