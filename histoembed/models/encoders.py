"""Frozen encoders: models that turn a batch of crops into one vector each.

An ``Encoder`` takes float crops in [0, 1] ([B, 3, H, W], any size), resizes them to the
model's input size, normalises them with the model's own mean/std and returns float32
features [B, D]. Names resolve in this order: a registry entry (``histoembed.models.zoo``), an
``hf-hub:org/name`` timm id, a local folder (timm's ``config.json`` with ``architecture``,
else a transformers folder), then a transformers id on the Hugging Face hub. The cache and
offline mode are honoured, and a hub that does not answer is told in seconds (``sources.hub_source``).
The loaders (``loaders``) read safetensors only and never run remote code; every one refuses weights
that would leave any of the model's at random (``weights.check_weights``): a model with random weights
still embeds, and its features look like any others.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from histoembed.core import feature_store
from histoembed.core.errors import UserError
from histoembed.models import zoo
from histoembed.models.float8 import check_fp8, to_float8
from histoembed.models.loaders import PACKAGED, Pool, load_hf, load_timm, timm_config
from histoembed.models.sources import entry_source, hub_source

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


# ---------------------------------------------------------------- names

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
        local = Path(source).is_dir()
        files = source if local else hub_source(source)
        if entry.library == "timm":
            module, info = load_timm(files, pool, entry)
        else:
            module, info = load_hf(files, entry.pool if pool == "auto" else pool, entry.norm)
        return module, info, (str(Path(source).resolve()) if local else source), entry.precision
    for prefix in ("hf-hub:", "hf_hub:"):
        if name.startswith(prefix):
            module, info = load_timm(hub_source(name[len(prefix):]), pool)
            return module, info, name, "bf16"
    folder = Path(name).expanduser()
    if _looks_like_path(name) and not folder.exists():
        raise _missing_folder(name)
    if folder.is_dir() and timm_config(str(folder)) is not None:
        module, info = load_timm(str(folder), pool)
    else:
        module, info = load_hf(str(folder) if folder.exists() else hub_source(name), pool)
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
