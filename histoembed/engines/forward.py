"""A batch's views through the encoder: what both engines run on every batch, and the encoder set up for it.

``queue_batch`` is the one path from decoded crops to features (stain normalisation, then view 0 and the
augmented views); the local loop and the Ray actors both call it, as ``embed_crops`` does for crops held in
memory (QC, predict). ``sized``, ``configured`` and ``checked_encoder`` choose the batch size and workers,
compile the forward and compare its precision with fp32 before a run; ``check_finite`` refuses NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from histoembed.core import cpus
from histoembed.core.config import AugmentSettings, EmbedSettings
from histoembed.core.console import console
from histoembed.core.errors import UserError
from histoembed.engines.batches import CropBatches
from histoembed.maths import stain
from histoembed.maths.augment import augment_batch
from histoembed.models.encoders import Encoder
from histoembed.models.precision import PrecisionCheck, check_precision
from histoembed.models.gpu_sizing import CPU_BATCH_SIZE, CPU_WORKERS, Sizes, cuda_sizes


def embed_views(encoder: Encoder, crops: torch.Tensor, image_ids: Sequence[str], crop_index: Sequence[int],
                views: Sequence[int], augment: AugmentSettings | None, seed: int,
                normaliser: stain.StainNormaliser | None = None) -> torch.Tensor:
    """[B, V, D] float32 features of uint8 crops [B, H, W, 3], one column per view in ``views``, on the host."""
    return queue_views(encoder, crops, image_ids, crop_index, views, augment, seed, normaliser).cpu()


def queue_views(encoder: Encoder, crops: torch.Tensor, image_ids: Sequence[str], crop_index: Sequence[int],
                views: Sequence[int], augment: AugmentSettings | None, seed: int,
                normaliser: stain.StainNormaliser | None = None) -> torch.Tensor:
    """``embed_views`` left on the encoder's device: on a GPU the work is only queued, so the host can
    draw the next view's augmentation, write the previous batch and fetch the next one meanwhile.

    With a stain ``normaliser`` the crops are normalised first, so every view (view 0 too) is
    made from the normalised crop; ``normaliser.last_unchanged`` then marks the crops it passed
    through unchanged.
    """
    x = crops.to(encoder.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    if normaliser is not None:
        x = normaliser(x)
    out = []
    for v in views:
        xv = x if v == 0 else augment_batch(x, image_ids, crop_index, [v] * len(x), augment or AugmentSettings(),
                                            seed)
        out.append(encoder(xv))
    return torch.stack(out, dim=1)


def queue_batch(encoder: Encoder, crops: torch.Tensor, image_ids: Sequence[str], crop_index: Sequence[int],
                views: Sequence[int], settings: EmbedSettings, augment: AugmentSettings,
                normaliser: stain.StainNormaliser | None = None) -> torch.Tensor:
    """One batch of one split's crops [B, H, W, 3] as features [B, V, D] on the encoder's device.

    Both engines call this for every batch (the local loop and the Ray actors), so whatever a
    batch goes through on its way to the encoder (stain normalisation, views) is the same for both.
    """
    return queue_views(encoder, crops, image_ids, crop_index, views, augment, settings.seed, normaliser)


def copy_to_host(feats: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying device features into pinned host memory; read them after ``event.synchronize()``."""
    if feats.device.type != "cuda":
        return feats, None
    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
    host.copy_(feats, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def check_finite(feats: torch.Tensor, image_ids: Sequence[str], crop_index: Sequence[int], views: Sequence[int],
                 splits: Sequence[str] | None, encoder: str) -> None:
    """Refuse NaN or infinity in the encoder's output [B, V, D], naming the first crop and view."""
    bad = ~torch.isfinite(feats).all(dim=-1)
    if bad.any():
        b, v = (int(i) for i in bad.nonzero()[0])
        split = f"{splits[b]} " if splits is not None else ""
        raise UserError(f"encoder {encoder} returned NaN or infinity for {split}image {image_ids[b]}, "
                        f"crop {crop_index[b]}, view {views[v]} ({int(bad.sum())} crop view(s) in this batch)",
                        hint="check that crop and the encoder's weights; on a GPU try --precision fp32")


def embed_crops(encoder: Encoder, crops: np.ndarray, views: int = 1, augment: AugmentSettings | None = None,
                seed: int = 0, image_ids: Sequence[str] | None = None, crop_index: Sequence[int] | None = None,
                batch_size: int = 64, normaliser: stain.StainNormaliser | None = None) -> np.ndarray:
    """[N * views, D] float32 features of uint8 crops [N, H, W, 3], crop-major (crop 0's views first).

    Without ids, crop i is keyed as image ``"crop"`` with crop index i (for the augmentation draw).
    """
    crops = np.ascontiguousarray(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise ValueError(f"crops must be uint8 [N, H, W, 3], got {crops.dtype} {crops.shape}")
    n = len(crops)
    ids = list(image_ids) if image_ids is not None else ["crop"] * n
    idx = list(crop_index) if crop_index is not None else list(range(n))
    parts = [embed_views(encoder, torch.from_numpy(crops[i:i + batch_size]), ids[i:i + batch_size],
                         idx[i:i + batch_size], range(views), augment, seed, normaliser)
             for i in range(0, n, batch_size)]
    if not parts:
        return np.zeros((0, encoder.dim), np.float32)
    feats = torch.cat(parts)
    check_finite(feats, ids, idx, range(views), None, encoder.name)
    return feats.reshape(n * views, -1).numpy()


# ---------------------------------------------------------------- the encoder for a run

def sized(settings: EmbedSettings, encoder: Encoder | None) -> EmbedSettings:
    """``settings`` with ``batch_size`` and ``workers`` set: those left unset are chosen from the GPU's free
    memory, the encoder's size and the usable CPUs for an encoder on CUDA (said once on the console), and
    take the CPU defaults otherwise. Values given (options, histoembed.toml) are kept as they are."""
    if settings.batch_size is not None and settings.workers is not None:
        return settings
    chosen = Sizes(CPU_BATCH_SIZE, CPU_WORKERS, "the CPU defaults")
    if encoder is not None and encoder.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(encoder.device)
        params = sum(p.numel() for p in encoder.module.parameters())
        chosen = cuda_sizes(free, params, encoder.dim, encoder.size, cpus.usable_cpus(), views=settings.repeats)
    update = {k: getattr(chosen, k) for k in ("batch_size", "workers") if getattr(settings, k) is None}
    if encoder is not None and encoder.device.type == "cuda":
        said = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in update.items())
        console.print(f"chose {said} for {encoder.name} on {torch.cuda.get_device_name(encoder.device)}: "
                      f"{chosen.why} (set them to override)", soft_wrap=True)
    return settings.model_copy(update=update)


def configured(encoder: Encoder, settings: EmbedSettings) -> Encoder:
    """``encoder`` compiled or not as ``settings`` say, for batches of ``settings.batch_size`` crops (``sized``)."""
    return dataclasses.replace(encoder, compile=settings.compile, fixed_batch=settings.batch_size)


def checked_encoder(encoder: Encoder, crops_path: Path, rows: list[int],
                    settings: EmbedSettings) -> tuple[Encoder, PrecisionCheck | None]:
    """The encoder to embed with, after comparing its precision with fp32 on the crops ``rows`` when asked.

    Default: checked when a GPU runs below fp32, in fp8 or compiled (against eager fp32). A failed
    check stops the run, naming the figures, or with ``fallback_fp32`` returns the encoder in eager fp32.
    """
    below_fp32 = encoder.precision != "fp32" or encoder.compile
    wanted = (settings.check_precision if settings.check_precision is not None
              else encoder.device.type == "cuda" or encoder.compile or encoder.precision == "fp8")
    if not wanted or not below_fp32 or not rows:
        return encoder, None
    _, crops = next(iter(CropBatches(crops_path, [np.asarray(rows)])))
    if not isinstance(crops, torch.Tensor):
        return encoder, None  # the embedding loop names the unreadable crop
    x = crops.to(encoder.device).permute(0, 3, 1, 2).float().div_(255)
    check = check_precision(encoder, x, settings.precision_threshold)
    if check.passed:
        return encoder, check
    if settings.fallback_fp32:
        return encoder.with_precision("fp32"), dataclasses.replace(check, fallback=True)
    raise UserError(f"encoder {encoder.name} in {check.precision} is not close to fp32 on real crops: "
                    f"{check.summary()}",
                    hint="embed in fp32 (--precision fp32), or add --fallback-fp32 to fall back by itself")
