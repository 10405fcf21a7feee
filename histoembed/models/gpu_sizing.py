"""Batch size and decode workers for the embed stage on a GPU, chosen from what the machine has.

``histoembed embed`` on CUDA leaves ``--batch-size`` and ``--workers`` unset by default; the
stage then calls :func:`cuda_sizes` once the encoder is on the GPU, and says what it chose.
Explicit options (or histoembed.toml) always win, and on the CPU the fixed defaults apply
(``CPU_BATCH_SIZE``, ``CPU_WORKERS``), so CPU runs behave as before.

The rule, from the figures in benchmarks/RESULTS.md (ViT-L/16 at 224 px in bf16 on one H100:
the bare forward gains 2 % from batch 128 to 256 and nothing beyond; the stage ran best with
6 decode workers, at 3,434 crop-views/s, and worse with 12):

* **Batch size**: the largest power of two whose working memory fits in ``MEMORY_SHARE`` of the
  GPU memory still free with the encoder loaded, at most ``MAX_BATCH``. The working memory of
  a crop is estimated as ``ACTIVATION_COPIES`` fp32 copies of its token states (tokens at
  stride 16 x the embedding width; measured for ViT-L/16: 13 MiB a crop at batch 512 in fp32)
  plus float32 copies of its views' pixels during augmentation: about 21 MiB for ViT-L/16 in
  4 views, so a GPU with 11 GiB free already reaches the cap.
* **Decode workers**: enough to feed the encoder's estimated rate. The forward's cost is
  estimated as 2 x parameters x tokens FLOPs a crop at ``GPU_FLOPS`` (what ViT-L in bf16 reached
  on an H100); a crop is decoded once for all its views, at ``DECODE_PER_WORKER`` crops/s per
  process, with a margin of ``DECODE_MARGIN``; at least 1 and at most ``MAX_WORKERS`` or the
  usable CPUs less one (the main process queues batches and writes the store).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CPU_BATCH_SIZE = 64        # the embed stage's batch on the CPU (and its default before this rule)
CPU_WORKERS = 2            # decode workers on the CPU
MIN_BATCH, MAX_BATCH = 16, 256
MEMORY_SHARE = 0.5         # of the free GPU memory, for one batch's activations and views
ACTIVATION_COPIES = 16     # fp32 copies of a crop's token states alive at once in a forward
PIXEL_COPIES = 4           # float32 copies of each view's pixels during augmentation
PATCH = 16
GPU_FLOPS = 3.8e14         # effective FLOP/s of ViT-L/16 in bf16 on one H100 (3,200 crops/s)
DECODE_PER_WORKER = 200.0  # 224-px crop PNGs decoded per second by one worker process
DECODE_MARGIN = 1.5
MAX_WORKERS = 8


@dataclass(frozen=True)
class Sizes:
    batch_size: int
    workers: int
    why: str                # one line for the console

    def __str__(self) -> str:
        return f"batch size {self.batch_size}, {self.workers} decode worker(s) ({self.why})"


def crop_bytes(dim: int, input_size: int, views: int) -> int:
    """Estimated GPU working memory of one crop in a batch: its token states and its views' pixels."""
    tokens = (input_size // PATCH) ** 2 + 1
    return ACTIVATION_COPIES * tokens * dim * 4 + PIXEL_COPIES * views * 3 * input_size * input_size * 4


def cuda_sizes(free_bytes: int, params: int, dim: int, input_size: int, cpus: int, views: int = 4) -> Sizes:
    """Batch size and decode workers for an encoder of ``params`` parameters, ``dim``-d output and
    ``input_size`` px input on a GPU with ``free_bytes`` free (encoder loaded), fed by ``cpus`` usable CPUs."""
    per_crop = crop_bytes(dim, input_size, views)
    fits = max(1, int(MEMORY_SHARE * max(0, free_bytes) // per_crop))
    batch = min(MAX_BATCH, max(MIN_BATCH, 2 ** int(math.log2(fits))))
    tokens = (input_size // PATCH) ** 2 + 1
    crops_per_s = GPU_FLOPS / max(1.0, 2.0 * params * tokens)
    need = math.ceil(DECODE_MARGIN * crops_per_s / max(1, views) / DECODE_PER_WORKER)  # decoded once, r views
    workers = max(1, min(need, MAX_WORKERS, max(1, cpus - 1)))
    why = (f"{free_bytes / 2**30:.1f} GiB free on the GPU, ~{per_crop / 2**20:.0f} MiB a crop; "
           f"encoder of {params / 1e6:.0f}M parameters at ~{crops_per_s:,.0f} crop-views/s; {cpus} usable CPU(s)")
    return Sizes(batch, workers, why)
