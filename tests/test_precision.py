"""The precision check: a model that overflows in fp16 or loses its signal in bf16 is caught, with its figures."""

from __future__ import annotations

import json

import pytest
import torch

from histoembed.core import store
from histoembed.models.encoders import load_encoder
from histoembed.models.precision import check_precision, cosine_per_row
from test_embed import write_crops


def save_tiny_vit(folder, *, scale_patch_embed: float = 1.0, patch_embed_bias: float | None = None, seed: int = 0):
    """A tiny timm ViT written by timm itself (config.json + model.safetensors), weights bent on purpose."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=0).eval()
    with torch.no_grad():
        model.patch_embed.proj.weight.mul_(scale_patch_embed)
        if patch_embed_bias is not None:
            model.patch_embed.proj.bias.fill_(patch_embed_bias)
    save_for_hf(model, str(folder), safe_serialization=True)
    return folder


def crops01(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_fp16_overflow_is_caught_with_its_figures(tmp_path):
    enc = load_encoder(str(save_tiny_vit(tmp_path / "overflow", scale_patch_embed=1e5)), precision="fp16")
    check = check_precision(enc, crops01())
    assert not check.passed
    assert check.nonfinite == 4 and check.crops == 4
    assert "4 crop(s) with NaN/Inf" in check.summary()
    assert torch.isfinite(enc.with_precision("fp32")(crops01())).all()   # fp32 itself is fine


def test_bf16_rounding_that_drowns_the_signal_is_caught(tmp_path):
    # Every patch token is 2000 + a small signal: bf16 keeps 8 bits of mantissa (steps of 16 at 2000).
    enc = load_encoder(str(save_tiny_vit(tmp_path / "offset", patch_embed_bias=2000.0)), precision="bf16")
    check = check_precision(enc, crops01())
    assert check.nonfinite == 0
    assert check.min_cosine < 0.999 and not check.passed
    assert f"lowest cosine {check.min_cosine:.6f}" in check.summary()


def test_a_well_behaved_model_passes_in_fp16(tmp_path):
    enc = load_encoder(str(save_tiny_vit(tmp_path / "fine")), precision="fp16")
    check = check_precision(enc, crops01())
    assert check.passed and check.min_cosine > 0.999 and check.nonfinite == 0


def test_cosine_per_row_is_one_for_equal_rows_and_treats_zero_rows_as_equal():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 4.0], [0.0, 0.0], [0.0, 1.0]])
    assert cosine_per_row(a, b).tolist() == pytest.approx([1.0, 1.0, 0.0])


def _meta(run):
    part = next((run / store.FEATURES_DIR).rglob("part-*.parquet"))
    return store.read_meta(part)


def test_embed_check_precision_stops_and_names_the_encoder_and_figures(tmp_path, cli):
    write_crops(tmp_path)
    model = save_tiny_vit(tmp_path / "overflow", scale_patch_embed=1e5)
    result = cli("embed", "--run", tmp_path, "--encoder", model, "--precision", "fp16", "--check-precision",
                 "--workers", "0", "--repeats", "1")
    assert result.exit_code == 2
    assert "overflow" in result.output and "fp16 vs fp32" in result.output and "NaN/Inf" in result.output
    assert "--fallback-fp32" in result.output
    assert not list((tmp_path / store.FEATURES_DIR).rglob("part-*.parquet"))


def test_embed_fallback_fp32_embeds_in_fp32_and_records_the_check(tmp_path, cli):
    write_crops(tmp_path)
    model = save_tiny_vit(tmp_path / "overflow", scale_patch_embed=1e5)
    result = cli("embed", "--run", tmp_path, "--encoder", model, "--precision", "fp16", "--check-precision",
                 "--fallback-fp32", "--workers", "0", "--repeats", "1")
    assert result.exit_code == 0, result.output
    assert "fell back to fp32" in result.output
    meta = _meta(tmp_path)
    assert meta["precision"] == "fp32"
    check = meta["precision_check"]
    assert check["precision"] == "fp16" and check["fallback"] and not check["passed"]
    assert check["nonfinite"] == check["crops"] > 0 and check["threshold"] == 0.999
    json.dumps(meta)  # plain JSON in the store's metadata


def test_a_passing_check_is_recorded_and_a_cpu_run_skips_it_by_default(tmp_path, cli):
    write_crops(tmp_path / "a")
    write_crops(tmp_path / "b")
    model = save_tiny_vit(tmp_path / "fine")
    result = cli("embed", "--run", tmp_path / "a", "--encoder", model, "--precision", "fp16", "--check-precision",
                 "--workers", "0", "--repeats", "1")
    assert result.exit_code == 0, result.output
    check = _meta(tmp_path / "a")["precision_check"]
    assert check["passed"] and check["min_cosine"] > 0.999 and _meta(tmp_path / "a")["precision"] == "fp16"
    result = cli("embed", "--run", tmp_path / "b", "--encoder", model, "--precision", "fp16", "--workers", "0",
                 "--repeats", "1")
    assert result.exit_code == 0, result.output
    assert _meta(tmp_path / "b")["precision_check"] is None
