"""Is a lower precision safe for this encoder on these crops? A comparison with fp32 before embedding.

bf16 and fp16 (a low-precision copy of the weights on a GPU) run several times faster, but some encoders overflow in fp16
(activations above 65,504 become Inf, then NaN) or lose the signal to rounding in bf16 (8
bits of mantissa), and the store would silently hold garbage. The check embeds one batch of
real crops twice, at the chosen precision and in fp32, and compares them crop by crop.
It is about the encoder's numerics; non-finite values in the written store are checked
separately, where the store is written.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class PrecisionCheck:
    encoder: str
    precision: str        # the precision under test
    crops: int
    nonfinite: int        # crops whose features hold a NaN or an Inf at that precision
    min_cosine: float     # to fp32, over the crops with finite features (NaN when there are none)
    mean_cosine: float
    threshold: float
    fallback: bool = False  # the run went on in fp32 instead

    @property
    def passed(self) -> bool:
        return self.nonfinite == 0 and self.min_cosine >= self.threshold

    def summary(self) -> str:
        return (f"{self.precision} vs fp32 on {self.crops} crops: lowest cosine {self.min_cosine:.6f}, "
                f"mean {self.mean_cosine:.6f} (threshold {self.threshold}), "
                f"{self.nonfinite} crop(s) with NaN/Inf")

    def as_meta(self) -> dict:
        """JSON-able, for the store's metadata (NaN written as None)."""
        meta = asdict(self)
        for k in ("min_cosine", "mean_cosine"):
            meta[k] = None if math.isnan(meta[k]) else meta[k]
        return {**meta, "passed": self.passed}


def cosine_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows, in float64 (a zero row against a zero row counts as 1)."""
    a, b = a.double(), b.double()
    dot = (a * b).sum(1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    both_zero = (a.abs().sum(1) == 0) & (b.abs().sum(1) == 0)
    return torch.where(both_zero, torch.ones_like(dot), dot / norms.clamp_min(1e-300))


def check_precision(encoder, crops01: torch.Tensor, threshold: float = 0.999) -> PrecisionCheck:
    """Compare ``encoder`` at its precision (compiled or not) with the same encoder in eager fp32 on float crops
    [B, 3, H, W] in [0, 1]."""
    low = encoder(crops01)
    ref = encoder.with_precision("fp32")(crops01)
    finite = torch.isfinite(low).all(dim=1)
    cos = cosine_per_row(low[finite], ref[finite])
    return PrecisionCheck(
        encoder=encoder.name, precision=encoder.precision + (" compiled" if encoder.compile else ""),
        crops=len(low), nonfinite=int((~finite).sum()),
        min_cosine=float(cos.min()) if len(cos) else float("nan"),
        mean_cosine=float(cos.mean()) if len(cos) else float("nan"), threshold=threshold)
