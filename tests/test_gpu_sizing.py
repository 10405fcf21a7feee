"""Batch size and decode workers chosen for the embed stage on CUDA (issue 22, item 1); the CPU keeps its defaults."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from histoembed.core.config import EmbedSettings
from histoembed.engines import forward
from histoembed.models.gpu_sizing import CPU_BATCH_SIZE, CPU_WORKERS, MAX_BATCH, MAX_WORKERS, MIN_BATCH, cuda_sizes

GIB = 2**30
VIT_L = dict(params=304_000_000, dim=1024, input_size=224)
VIT_S = dict(params=22_000_000, dim=384, input_size=224)


def test_vit_l_on_an_h100_gets_the_best_measured_setting():
    # benchmarks/RESULTS.md: batch 256 with 6 decode workers was the best hand-tuned stage on one H100.
    s = cuda_sizes(76 * GIB, cpus=16, **VIT_L)
    assert (s.batch_size, s.workers) == (256, 6)
    assert "GiB free" in s.why and "16 usable CPU(s)" in s.why


def test_batch_is_a_power_of_two_that_shrinks_with_free_memory():
    sizes = [cuda_sizes(gib * GIB, cpus=16, **VIT_L).batch_size for gib in (0.1, 0.5, 1, 2, 4, 8, 16, 80)]
    assert sizes == sorted(sizes) and sizes[0] == MIN_BATCH and sizes[-1] == MAX_BATCH
    assert all(b & (b - 1) == 0 for b in sizes)
    assert cuda_sizes(2 * GIB, cpus=16, **VIT_L).batch_size < MAX_BATCH  # a small or busy GPU


def test_workers_fit_the_cpus_and_the_encoders_speed():
    assert cuda_sizes(40 * GIB, cpus=2, **VIT_L).workers == 1   # the main process keeps one CPU
    assert cuda_sizes(40 * GIB, cpus=1, **VIT_L).workers == 1
    small, large = cuda_sizes(40 * GIB, cpus=64, **VIT_S), cuda_sizes(40 * GIB, cpus=64, **VIT_L)
    assert small.workers > large.workers and small.workers == MAX_WORKERS  # a fast encoder needs more decoders
    one_view = cuda_sizes(40 * GIB, cpus=64, views=1, **VIT_L)
    assert one_view.workers > large.workers  # crops are decoded once for all their views


def _fake_cuda_encoder():
    return SimpleNamespace(device=torch.device("cuda", 0), module=torch.nn.Linear(1000, 1000), dim=1024, size=224,
                           name="vit-l")


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(forward.cpus, "usable_cpus", lambda: 4)


def test_unset_sizes_resolve_on_cuda_and_say_so(fake_gpu, capsys):
    settings = forward.sized(EmbedSettings(), _fake_cuda_encoder())
    expected = cuda_sizes(40 * GIB, 1000 * 1000 + 1000, 1024, 224, 4, views=EmbedSettings().repeats)
    assert (settings.batch_size, settings.workers) == (expected.batch_size, expected.workers)
    out = capsys.readouterr().err
    assert f"--batch-size {expected.batch_size}" in out and "Fake GPU" in out and "to override" in out


def test_explicit_sizes_win_on_cuda(fake_gpu, capsys):
    settings = forward.sized(EmbedSettings(batch_size=32, workers=0), _fake_cuda_encoder())
    assert (settings.batch_size, settings.workers) == (32, 0)
    assert capsys.readouterr().err == ""
    half = forward.sized(EmbedSettings(batch_size=32), _fake_cuda_encoder())
    assert half.batch_size == 32 and half.workers == cuda_sizes(40 * GIB, 1_001_000, 1024, 224, 4).workers
    assert "--workers" in capsys.readouterr().err


def test_the_cpu_keeps_its_defaults(capsys):
    cpu = SimpleNamespace(device=torch.device("cpu"), name="x")
    assert (forward.sized(EmbedSettings(), cpu).batch_size, forward.sized(EmbedSettings(), cpu).workers) == \
        (CPU_BATCH_SIZE, CPU_WORKERS) == (64, 2)
    assert forward.sized(EmbedSettings(workers=5), None).workers == 5
    assert capsys.readouterr().err == ""


def test_options_have_help_and_unset_defaults():
    from typer.testing import CliRunner

    from histoembed.cli import app

    help_text = CliRunner().invoke(app, ["embed", "--help"], env={"COLUMNS": "300"}).output
    assert "on CUDA chosen from the GPU's free memory" in " ".join(help_text.split())
    assert EmbedSettings().batch_size is None and EmbedSettings().workers is None
