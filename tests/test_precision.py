"""The precision check: a model that overflows in fp16 or loses its signal in bf16 is caught, with its figures."""

from __future__ import annotations

import json

import pytest
import torch

from histoembed.core import feature_store, store
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


# ---------------------------------------------------------------- fp8 and compile (issue 22)

def test_fp8_puts_the_linear_layers_in_float8_and_stays_close_to_fp32(tmp_path):
    from histoembed.models.float8 import FP8, Float8Linear

    enc = load_encoder(str(save_tiny_vit(tmp_path / "fine")), precision="fp8")
    low = enc._low_precision_module()
    linears = [m for m in low.modules() if isinstance(m, Float8Linear)]
    assert len(linears) == 8 and all(m.weight.dtype == FP8 for m in linears)  # qkv, proj, fc1, fc2 x 2 blocks
    assert not any(isinstance(m, torch.nn.Linear) for m in low.modules())
    assert all(isinstance(m, torch.nn.Linear) for m in enc.module.modules() if "qkv" in type(m).__name__.lower())
    check = check_precision(enc, crops01(8), threshold=0.99)
    assert check.passed and 0.99 < check.min_cosine < 0.99999  # float8 rounds: close, never equal


def test_fp8_that_drowns_the_signal_is_caught(tmp_path):
    enc = load_encoder(str(save_tiny_vit(tmp_path / "offset", patch_embed_bias=2000.0)), precision="fp8")
    check = check_precision(enc, crops01(), threshold=0.99)
    assert not check.passed and check.min_cosine < 0.99


def test_fp8_is_refused_on_a_gpu_without_float8_tensor_cores(monkeypatch):
    from histoembed.core.errors import UserError
    from histoembed.models.float8 import check_fp8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UserError, match="A100-SXM4-80GB has 8.0") as e:
        check_fp8(torch.device("cuda", 0))
    assert "bf16" in e.value.hint
    check_fp8(torch.device("cpu"))  # emulated on a CPU: allowed


def test_embed_fp8_is_checked_by_default_and_keyed_apart_from_fp32(tmp_path, cli):
    write_crops(tmp_path / "a")
    write_crops(tmp_path / "b")
    model = save_tiny_vit(tmp_path / "fine")
    args = ("--encoder", model, "--workers", "0", "--repeats", "2")
    result = cli("embed", "--run", tmp_path / "a", *args, "--precision", "fp8", "--precision-threshold", "0.99")
    assert result.exit_code == 0, result.output
    assert "precision check passed: fp8 vs fp32" in result.output
    meta = _meta(tmp_path / "a")
    assert meta["precision"] == "fp8" and meta["precision_check"]["passed"]
    result = cli("embed", "--run", tmp_path / "a", *args, "--precision", "fp8")  # the default threshold, 0.999
    assert result.exit_code == 2 and "fp8 vs fp32" in result.output and "--fallback-fp32" in result.output
    assert cli("embed", "--run", tmp_path / "b", *args).exit_code == 0
    assert _meta(tmp_path / "b")["key"] != meta["key"]


def test_embed_compile_pads_to_one_shape_and_writes_the_eager_store(tmp_path, cli):
    write_crops(tmp_path / "eager")
    write_crops(tmp_path / "compiled")
    model = save_tiny_vit(tmp_path / "fine")
    args = ("--encoder", model, "--workers", "0", "--repeats", "2", "--batch-size", "8")  # 15 + 6 crops: padded
    assert cli("embed", "--run", tmp_path / "eager", *args).exit_code == 0
    result = cli("embed", "--run", tmp_path / "compiled", *args, "--compile")
    assert result.exit_code == 0, result.output
    assert "precision check passed: fp32 compiled vs fp32" in result.output  # checked by default, on the CPU too
    eager, compiled = (feature_store.read_features(next((tmp_path / r / store.FEATURES_DIR).iterdir()))
                       for r in ("eager", "compiled"))
    assert list(compiled.keys()) == list(eager.keys()) and len(compiled) == 21 * 2
    assert abs(compiled.embedding - eager.embedding).max() < 1e-5
    assert _meta(tmp_path / "compiled")["key"] == _meta(tmp_path / "eager")["key"]  # compiling changes no feature
    result = cli("embed", "--run", tmp_path / "compiled", *args)
    assert "up to date" in result.output


def test_a_failed_compilation_is_a_clear_error(tmp_path, cli, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    torch._dynamo.reset()
    write_crops(tmp_path)
    model = save_tiny_vit(tmp_path / "fine")
    result = cli("embed", "--run", tmp_path, "--encoder", model, "--workers", "0", "--repeats", "1", "--compile")
    assert result.exit_code == 2
    assert "torch.compile could not compile encoder" in result.output and "without --compile" in result.output
    assert not list((tmp_path / store.FEATURES_DIR).rglob("part-*.parquet"))


def test_a_device_without_float8_products_is_a_clear_error(tmp_path, monkeypatch):
    from histoembed.core.errors import UserError

    enc = load_encoder(str(save_tiny_vit(tmp_path / "fine")), precision="fp8")

    def no_kernel(*args, **kwargs):
        raise RuntimeError("_scaled_mm is not supported on this device")

    monkeypatch.setattr(torch, "_scaled_mm", no_kernel)
    with pytest.raises(UserError, match="float8 matrix products fail on cpu") as e:
        enc(crops01())
    assert "bf16" in e.value.hint
