"""Stain normalisation of crops, batched on the encoder's device: Macenko or Reinhard, to one target.

Macenko (Macenko et al., ISBI 2009) as torchstain's ``TorchMacenkoNormalizer`` does it:
optical density ``OD = -ln((I + 1) / Io)`` with ``Io`` 240, the pixels with every channel's OD
at least ``BETA`` (stained, not slide), the plane of their two main principal directions,
the stain vectors at the ``ALPHA`` and ``100 - ALPHA`` percentiles of the angle in that
plane (haematoxylin first: the one with the larger red OD), the concentrations by least
squares, each stain's 99th percentile brought to the target's, and the pixel rebuilt with
the target's stain vectors. torchstain fits one image at a time (a Python loop of small
kernels per crop), keeps its reference on the CPU, counts padding as stain and cannot say
when an estimate failed; a batch of crops on a GPU needs all of those, so the same steps run
here on the whole batch at once (masked covariance, batched ``eigh``, nearest-rank
percentiles from ``topk`` of each row's tail, least squares through the stain matrix's
pseudo-inverse). What differs from torchstain: pixels of the crops' padding colour are
neither counted nor changed; the main principal direction is turned to positive OD (the
sign ``eigh`` returns is arbitrary); crops of 128 px or more are estimated from every
second pixel of every second row (``ESTIMATE_STEP``; the rebuild uses every pixel); a pixel is
rebuilt as the exact inverse of its OD (torchstain's is one grey level brighter) and not
rounded to integers. ``tests/test_stain.py`` checks the batch against
torchstain's ``normalize`` with every pixel read. Fitting one reference image
(``--stain-target``) is torchstain's own ``fit``.

Reinhard (Reinhard et al. 2001) as torchstain's ``TorchReinhardNormalizer``: each CIELAB
channel standardised and given the target's mean and standard deviation, through
torchstain's ``rgb2lab``/``lab2rgb``; the statistics are taken over the crop's pixels as
torchstain takes them over the whole image, padding aside. torchstain's colour conversion keeps its matrices on
the CPU, so on a GPU this step runs on the CPU.

A crop whose stain cannot be estimated passes through unchanged, and is counted (the part
footers list them, ``feature_store.stain_summary`` adds them up): less than ``min_tissue`` of its
non-padding pixels stained (a blank crop, a crop of slide), fewer than
``MIN_STAINED_PIXELS`` pixels to estimate from, colours no H&E stain makes (more than
``MAX_FOREIGN_SHARE`` of the stained pixels absorbing nearly as much blue as green or more, or
far more red than green: a cartoon, a paste, brown DAB, blue sky), stain vectors far from the standard H&E
ones, or a non-finite estimate.

The default target is the training crops' robust median stain: the per-crop Macenko stain
vectors and 99th percentile concentrations (Reinhard: LAB means and deviations) of up to
``TARGET_CROPS`` training crops, their element-wise median, computed once per run and kept in
``run/features/stain-<method>.json`` (plain JSON) with a stamp of the crops it came from;
every store embedded with it records it in its metadata, and the store key holds its values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from histoembed.core import store
from histoembed.core.config import MEAN_FILL
from histoembed.core.errors import UserError
from histoembed.inputs.dataset import read_image
from histoembed.inputs.pixels import decode_png

IO = 240.0          # transmitted light intensity, torchstain's default
ALPHA = 1.0         # percentile of the stain angles (torchstain's alpha)
BETA = 0.15         # OD below which a channel counts as slide (torchstain's beta)
MAX_C_PERCENTILE = 99.0
# torchstain's reference H&E stain vectors (columns: haematoxylin, eosin; rows R, G, B): what "H&E" means for
# the plausibility check.
HE_REFERENCE = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
# When an estimate is not H&E. Both stains absorb green the most, or nearly (OD blue / green: haematoxylin 0.41,
# eosin 0.11; red / green: 0.93 and 0.07), so stained tissue looks pink to purple. Yellow, orange, green, brown
# and maroon absorb as much blue as green or more (cartoons, DAB, pastes); sky blue and cyan far more red. Measured
# on synthetic crops of 64 and 224 px: the share of tissue pixels of such colours is 0.00-0.08 for H&E
# (standard stains and the planted shifts), 0.8-1.0 for crops of the cartoons. Cosine of the estimated stain
# vectors to torchstain's reference: 0.67-1.0 for H&E.
MAX_FOREIGN_SHARE = 0.5
MAX_BLUE_TO_GREEN = 0.75
MAX_RED_TO_GREEN = 1.5
MIN_COSINE = 0.6
MIN_STAINED_PIXELS = 64
ESTIMATE_STEP = 2    # the stain of a crop of 128 px or more is estimated from every 2nd pixel of every 2nd row
TARGET_CROPS = 1024  # training crops the default target is the median of (evenly spaced)
TARGET_FILE = "stain-{method}.json"  # under run/features/
TARGET_VERSION = 1


@dataclass(frozen=True)
class StainTarget:
    """What crops are normalised to: Macenko stain vectors and concentrations, or Reinhard LAB statistics."""

    method: str                                   # macenko | reinhard
    values: dict                                  # macenko: he [3][2], max_c [2]; reinhard: means [3], stds [3]
    source: str                                   # a reference image's path, or "training crops"
    crops: int = 1                                # crops (or images) the values are the median of

    def key(self) -> dict:
        """The values that decide the output (rounded, so a re-computed target keys the same)."""
        values = json.loads(json.dumps(self.values), parse_float=lambda v: round(float(v), 5))
        return {"method": self.method, "values": values}


@dataclass
class Estimate:
    """Per-crop Macenko estimates of a batch (tensors on the batch's device)."""

    counted: torch.Tensor   # bool [B, n]: the sampled pixels that are not padding
    stained: torch.Tensor   # bool [B, n]: counted, and every channel's OD at least BETA (torchstain's rule)
    he: torch.Tensor        # [B, 3, 2] stain vectors (columns H, E)
    max_c: torch.Tensor     # [B, 2] 99th percentile concentrations
    ok: torch.Tensor        # bool [B]: the estimate is usable


def _row_percentile(values: torch.Tensor, keep: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile of each row's kept values [B, N], nearest rank as torchstain's ``percentile``.

    Only the tail that holds the rank is ordered (``topk``, not a sort of the whole row), with
    a tail length known without reading the device: the percentiles used lie near 1 and 99.
    """
    n = keep.sum(dim=1)
    rank = torch.round((q / 100) * (n - 1).clamp_min(0).to(torch.float64)).long()   # from the smallest
    top = q > 50
    if top:
        rank = (n - 1).clamp_min(0) - rank                                           # from the largest
    k = min(values.shape[1], int(round(min(q, 100 - q) / 100 * (values.shape[1] - 1))) + 2)
    filled = torch.where(keep, values, torch.full_like(values, -torch.inf if top else torch.inf))
    tail = filled.topk(k, dim=1, largest=top, sorted=True).values
    return tail.gather(1, rank.clamp_max(k - 1)[:, None]).squeeze(1)


def padding_mask(rgb255: torch.Tensor, fill: tuple[int, int, int] | None) -> torch.Tensor:
    """bool [B, N]: pixels of exactly the crops' padding colour (rgb255: [B, 3, H, W] in 0..255)."""
    b = rgb255.shape[0]
    if fill is None:
        return torch.zeros((b, rgb255.shape[2] * rgb255.shape[3]), dtype=torch.bool, device=rgb255.device)
    colour = torch.tensor(fill, dtype=rgb255.dtype, device=rgb255.device).view(1, 3, 1, 1)
    return ((rgb255 - colour).abs() < 0.5).all(dim=1).reshape(b, -1)


def optical_density(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] rgb in [0, 1] -> OD [B, 3, H * W] as torchstain computes it (``-ln((I + 1) / Io)``, I in 0..255)."""
    return -torch.log((x.float().reshape(x.shape[0], 3, -1) * 255 + 1) / IO)


def from_density(od: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """OD [B, 3, N] back to rgb [B, 3, H, W] in [0, 1]: the inverse of ``optical_density`` (torchstain rebuilds
    with ``Io * exp(-OD)``, one grey level brighter, and truncates to integers)."""
    return (IO * torch.exp(-od) - 1).clamp_(0, 255).div_(255).reshape(shape)


def _sample(x: torch.Tensor) -> torch.Tensor:
    """The pixels the estimate reads: every ``ESTIMATE_STEP``-th of every ``ESTIMATE_STEP``-th row (a small
    crop: all)."""
    step = ESTIMATE_STEP if min(x.shape[2], x.shape[3]) >= 128 else 1
    return x[:, :, ::step, ::step]


def estimate(x: torch.Tensor, fill: tuple[int, int, int] | None = None, min_tissue: float = 0.1,
             step: int | None = None) -> Estimate:
    """Macenko's stain vectors and concentrations of every crop of x ([B, 3, H, W] in [0, 1]) at once.

    ``ok`` is False for a crop with less than ``min_tissue`` of its non-padding pixels stained
    (any channel's OD at least ``BETA``), fewer than ``MIN_STAINED_PIXELS`` pixels for the
    estimate, more than ``MAX_FOREIGN_SHARE`` of its stained pixels of colours no H&E stain makes
    (absorbing nearly as much blue as green or more, or far more red), or stain vectors further than ``MIN_COSINE``
    from the standard ones.
    The estimate reads every ``step``-th pixel of every ``step``-th row (default: ``ESTIMATE_STEP`` for
    crops of 128 px or more; 1: all, as torchstain):
    percentiles of tens of thousands of pixels barely move, and the estimate is most of the cost.
    Concentrations come from the stain matrix's pseudo-inverse, the least-squares solution
    torchstain's ``lstsq`` finds, as one batched product (``lstsq`` solves crop by crop).
    """
    b = x.shape[0]
    x = x[:, :, ::step, ::step] if step else _sample(x)
    od = optical_density(x)                                                            # [B, 3, n]
    counted = ~padding_mask(x.float() * 255, fill)
    stained = counted & (od >= BETA).all(dim=1)
    n = stained.sum(dim=1)
    weight = stained.to(od.dtype)[:, None, :]
    mean = (od * weight).sum(dim=2, keepdim=True) / n.clamp_min(1)[:, None, None]
    centred = (od - mean) * weight
    cov = centred @ centred.transpose(1, 2) / (n - 1).clamp_min(1)[:, None, None]
    # eigh of a singular or non-finite matrix (a crop of one colour) fails: give those rows the identity.
    few = n < MIN_STAINED_PIXELS
    eye = torch.eye(3, dtype=cov.dtype, device=cov.device).expand(b, 3, 3)
    cov = torch.where((few | ~torch.isfinite(cov).all(dim=(1, 2)))[:, None, None], eye, cov)
    _, vectors = torch.linalg.eigh(cov)
    plane = vectors[:, :, 1:3].clone()                                                # [B, 3, 2]
    turn = torch.where(plane[:, :, 1].sum(dim=1) < 0, -1.0, 1.0).to(plane.dtype)      # main direction: positive OD
    plane[:, :, 1] *= turn[:, None]
    t = plane.transpose(1, 2) @ od                                                    # [B, 2, N]
    phi = torch.atan2(t[:, 1], t[:, 0])
    lo, hi = _row_percentile(phi, stained, ALPHA), _row_percentile(phi, stained, 100 - ALPHA)
    v_lo = (plane @ torch.stack([lo.cos(), lo.sin()], dim=1)[..., None]).squeeze(2)   # [B, 3]
    v_hi = (plane @ torch.stack([hi.cos(), hi.sin()], dim=1)[..., None]).squeeze(2)
    h_first = (v_lo[:, 0] > v_hi[:, 0])[:, None]
    he = torch.stack([torch.where(h_first, v_lo, v_hi), torch.where(h_first, v_hi, v_lo)], dim=2)
    reference = torch.tensor(HE_REFERENCE, dtype=he.dtype, device=he.device)
    normal = torch.linalg.cross(he[:, :, 0], he[:, :, 1], dim=1)
    found = ~few & torch.isfinite(he).all(dim=(1, 2)) & (normal.norm(dim=1) > 1e-3)  # two distinct stains
    he = torch.where(found[:, None, None], he, reference)   # rows without an estimate: solved, then passed through
    conc = torch.linalg.pinv(he) @ od                                                 # [B, 2, N]
    max_c = torch.stack([_row_percentile(conc[:, s], counted, MAX_C_PERCENTILE) for s in range(2)], dim=1)
    cosine = torch.nn.functional.cosine_similarity(he, reference[None], dim=1)       # [B, 2]
    tissue = counted & (od.amax(dim=1) >= BETA)
    n_tissue = tissue.sum(dim=1)
    share = n_tissue / counted.sum(dim=1).clamp_min(1)
    foreign = (od[:, 2] > MAX_BLUE_TO_GREEN * od[:, 1]) | (od[:, 0] > MAX_RED_TO_GREEN * od[:, 1])
    not_he = (tissue & foreign).sum(dim=1) / n_tissue.clamp_min(1)
    ok = ((share >= min_tissue) & found & (not_he <= MAX_FOREIGN_SHARE) & (cosine >= MIN_COSINE).all(dim=1)
          & (max_c > 0).all(dim=1) & torch.isfinite(max_c).all(dim=1))
    return Estimate(counted, stained, he, max_c, ok)


def macenko_batch(x: torch.Tensor, target: StainTarget, fill: tuple[int, int, int] | None,
                  min_tissue: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised crops, bool [B] passed through unchanged).

    A pixel's new OD is ``HE_target diag(maxC_target / maxC) pinv(HE) OD``: torchstain's
    concentrations, rescaled and rebuilt with the target's stains, as one 3 x 3 matrix per crop.
    """
    est = estimate(x, fill, min_tissue)
    he_t = torch.tensor(target.values["he"], dtype=est.he.dtype, device=x.device)[None]
    max_c_t = torch.tensor(target.values["max_c"], dtype=est.he.dtype, device=x.device)
    scale = torch.where(est.ok[:, None], max_c_t / est.max_c.clamp_min(1e-6), torch.ones_like(est.max_c))
    mix = he_t @ (scale[..., None] * torch.linalg.pinv(est.he))                          # [B, 3, 3]
    out = from_density(mix @ optical_density(x), x.shape).to(x.dtype)
    return _keep(x, out, fill, est.ok), ~est.ok


def _keep(x: torch.Tensor, out: torch.Tensor, fill: tuple[int, int, int] | None, ok: torch.Tensor) -> torch.Tensor:
    """``out`` where the crop was normalised and the pixel is not padding, else ``x``."""
    b, _, h, w = x.shape
    use = (~padding_mask(x.float() * 255, fill) & ok[:, None]).view(b, 1, h, w)
    return torch.where(use, out, x)


def _lab(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] rgb in [0, 1] -> CIELAB [B, 3, N] in torchstain's (OpenCV) units, on the CPU."""
    from torchstain.torch.utils.rgb2lab import rgb2lab

    b, _, h, w = x.shape
    flat = x.detach().float().cpu().permute(1, 0, 2, 3).reshape(3, b * h, w)   # rgb2lab takes [3, ...]
    return rgb2lab(flat.clone()).reshape(3, b, h * w).permute(1, 0, 2)


def _rgb(lab: torch.Tensor, h: int, w: int) -> torch.Tensor:
    from torchstain.torch.utils.lab2rgb import lab2rgb

    b = lab.shape[0]
    rgb = lab2rgb(lab.permute(1, 0, 2).reshape(3, b * h, w))                    # [B * H, W, 3]
    return rgb.reshape(b, h, w, 3).permute(0, 3, 1, 2)


def lab_stats(lab: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-crop mean and standard deviation [B, 3] of each LAB channel over the kept pixels."""
    w = keep.to(lab.dtype)[:, None, :]
    n = w.sum(dim=2).clamp_min(2)
    mean = (lab * w).sum(dim=2) / n
    var = (((lab - mean[..., None]) ** 2) * w).sum(dim=2) / (n - 1)
    return mean, var.sqrt()


def reinhard_batch(x: torch.Tensor, target: StainTarget, fill: tuple[int, int, int] | None,
                   min_tissue: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised crops, bool [B] passed through unchanged): the LAB statistics of the non-padding pixels
    moved to the target's."""
    est = estimate(x, fill, min_tissue)
    mean, std = lab_stats(_lab(_sample(x)), est.counted.cpu())
    mean_t = torch.tensor(target.values["means"], dtype=mean.dtype)[None, :, None]
    std_t = torch.tensor(target.values["stds"], dtype=mean.dtype)[None, :, None]
    lab = (_lab(x) - mean[..., None]) / std[..., None].clamp_min(1e-6) * std_t + mean_t
    rgb = _rgb(lab, x.shape[2], x.shape[3]).to(device=x.device, dtype=x.dtype)
    ok = est.ok & torch.isfinite(rgb).all(dim=(1, 2, 3))
    return _keep(x, rgb, fill, ok), ~ok


METHODS = {"macenko": macenko_batch, "reinhard": reinhard_batch}


@dataclass
class StainNormaliser:
    """Normalises batches of crops to ``target``; counts the crops that pass through unchanged."""

    target: StainTarget
    fill: tuple[int, int, int] | None
    min_tissue: float = 0.1
    normalised: int = 0
    unchanged: int = 0
    last_unchanged: torch.Tensor | None = field(default=None, repr=False)  # bool [B] of the last batch, on its device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [B, 3, H, W] in [0, 1] on any device -> the same shape, device and dtype."""
        out, passed = METHODS[self.target.method](x, self.target, self.fill, self.min_tissue)
        self.last_unchanged = passed
        return out


# ---------------------------------------------------------------- targets

def target_from_image(path: Path, method: str, max_pixels: int | None = None) -> StainTarget:
    """The stain of one reference image, fitted by torchstain (Macenko), or its LAB statistics (Reinhard)."""
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    path = Path(path)
    if not path.is_file():
        raise UserError("stain target image not found", path=path, hint="pass an existing image to --stain-target")
    rgb = read_image(path, max_pixels)
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)   # a writable copy
    est = estimate(x[None].float() / 255)
    if not bool(est.ok[0]):
        raise UserError("no H&E stain can be estimated from this image (too little stained tissue, or colours "
                        "that are not haematoxylin and eosin)", path=path,
                        hint="choose a reference image that is mostly H&E tissue")
    if method == "macenko":
        fitted = TorchMacenkoNormalizer()
        fitted.fit(x)
        he = fitted.HERef
        he = he * torch.where(he.sum(dim=0) < 0, -1.0, 1.0)   # the sign of eigh's vectors is arbitrary
        values = {"he": he.tolist(), "max_c": fitted.maxCRef.tolist()}
    else:
        mean, std = lab_stats(_lab(_sample(x[None]).float() / 255), est.counted.cpu())
        values = {"means": mean[0].tolist(), "stds": std[0].tolist()}
    return StainTarget(method, values, str(path))


def median_target(method: str, batches, fill: tuple[int, int, int] | None, min_tissue: float) -> StainTarget:
    """The element-wise median stain of the usable crops of ``batches`` (float [B, 3, H, W] tensors)."""
    parts: dict[str, list] = {}
    for x in batches:
        est = estimate(x, fill, min_tissue)
        ok = est.ok
        if method == "macenko":
            parts.setdefault("he", []).append(est.he[ok].cpu())
            parts.setdefault("max_c", []).append(est.max_c[ok].cpu())
        else:
            mean, std = lab_stats(_lab(_sample(x)), est.counted.cpu())
            parts.setdefault("means", []).append(mean[ok.cpu()])
            parts.setdefault("stds", []).append(std[ok.cpu()])
    stacked = {k: torch.cat(v) for k, v in parts.items()} if parts else {}
    n = len(next(iter(stacked.values()))) if stacked else 0
    if n == 0:
        raise UserError("no training crop has a stain that can be estimated (too little stained tissue, or "
                        "colours that are not haematoxylin and eosin)",
                        hint="pass a reference image with --stain-target, or embed without --stain-norm")
    median = {k: v.median(dim=0).values for k, v in stacked.items()}
    if method == "macenko":
        median["he"] = median["he"] / median["he"].norm(dim=0, keepdim=True)   # unit stain vectors
    return StainTarget(method, {k: v.tolist() for k, v in median.items()}, "training crops", n)


def training_target(run: Path, method: str, fill: tuple[int, int, int] | None, min_tissue: float,
                    device: torch.device, batch_size: int = 64) -> StainTarget:
    """The training crops' median stain, read from ``run/features/stain-<method>.json`` when it was computed
    from the same crops with the same thresholds, else computed (up to ``TARGET_CROPS`` crops) and saved."""
    run = Path(run)
    crops_path = run / store.CROPS_FILE
    path = run / store.FEATURES_DIR / TARGET_FILE.format(method=method)
    stamp = store.config_key("stain-target", TARGET_VERSION, method, store.train_crops_digest(run),
                             list(fill) if fill else None, min_tissue, MIN_COSINE, MAX_FOREIGN_SHARE, MAX_BLUE_TO_GREEN,
                             MAX_RED_TO_GREEN, ESTIMATE_STEP,
                             TARGET_CROPS)
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("stamp") == stamp:
                return StainTarget(**saved["target"])
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: computed again below
    splits = pq.read_table(crops_path, columns=["split"])["split"].to_pylist()
    rows = [r for r, s in enumerate(splits) if s == "train"]
    if not rows:
        raise UserError("no training crops to take the stain target from", path=crops_path,
                        hint="pass a reference image with --stain-target")
    if len(rows) > TARGET_CROPS:
        rows = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, TARGET_CROPS).round()]
    pngs = pq.read_table(crops_path, columns=["png"])["png"]

    def batches():
        for start in range(0, len(rows), batch_size):
            crops = [decode_png(pngs[r].as_py()) for r in rows[start:start + batch_size]]
            yield torch.from_numpy(np.stack(crops)).to(device).permute(0, 3, 1, 2).float().div_(255)

    target = median_target(method, batches(), fill, min_tissue)
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_json({"stamp": stamp, "target": asdict(target)}, path)
    return target


# ---------------------------------------------------------------- the embed stage's normaliser

def crops_fill(run: Path) -> tuple[int, int, int]:
    """The padding colour the run's crops were cut with (pixels of it are neither counted nor changed)."""
    settings = store.read_meta(Path(run) / store.CROPS_FILE).get("settings") or {}
    return tuple(int(v) for v in settings.get("fill", MEAN_FILL))


def for_run(run: Path, method: str, target_image: str | None, min_tissue: float, device: torch.device,
            max_pixels: int | None = None) -> StainNormaliser | None:
    """The normaliser the embed stage uses (None for ``none``): to ``target_image``, else the training crops' median."""
    if method == "none":
        return None
    if method not in METHODS:
        raise UserError(f"unknown stain normalisation {method!r}", hint="choose none, macenko or reinhard")
    fill = crops_fill(run)
    target = (target_from_image(Path(target_image), method, max_pixels) if target_image
              else training_target(run, method, fill, min_tissue, device))
    return StainNormaliser(target, fill, min_tissue)


def as_meta(normaliser: StainNormaliser | None) -> dict | None:
    """What the store records of its normalisation (enough to normalise new crops the same way)."""
    if normaliser is None:
        return None
    return {"target": asdict(normaliser.target), "fill": list(normaliser.fill) if normaliser.fill else None,
            "min_tissue": normaliser.min_tissue}


def from_meta(meta: dict | None) -> StainNormaliser | None:
    """The normaliser a store was embedded with, from its metadata (None: none)."""
    if not meta:
        return None
    fill = tuple(meta["fill"]) if meta.get("fill") else None
    return StainNormaliser(StainTarget(**meta["target"]), fill, float(meta["min_tissue"]))


def target_key(normaliser: StainNormaliser | None) -> dict | None:
    """What of the normaliser keys a feature store (``feature_store.store_key``): its target's values."""
    return normaliser.target.key() if normaliser is not None else None
