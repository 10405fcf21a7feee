"""Batched, seeded augmentations of crops, run on the encoder's device.

Each row of a batch is one view of one crop. View 0 is the clean crop and comes back
bit-identical; views 1..r-1 get the reference recipe, in this order:

1. geometry: horizontal/vertical flips as exact pixel permutations (through
   ``grid_sample`` a flip is off by up to 3e-5 at 224 px, the rounding of its normalised
   grid), then rotation and an elastic displacement field (Simard et al. 2003: U(-1, 1)
   per pixel, Gaussian-smoothed with ``elastic_sigma``, scaled by ``elastic_alpha``
   pixels) in one bilinear ``grid_sample``, so a view is interpolated once. Padding is
   *reflection*: rotated corners and displaced edges show mirrored tissue instead of
   black wedges or edge-pixel streaks, so the view keeps the texture statistics the
   encoder expects.
2. Macenko stain perturbation (off by default, ``macenko_p``), as torchstain's
   ``TorchMacenkoAugmentor``: each crop's own stain vectors and concentrations by Macenko
   (``histoembed.maths.stain.estimate``, batched), each stain's concentrations scaled by alpha and
   shifted by beta. Applied as the change of OD, ``OD + HE (C (alpha - 1) + beta)``, so
   alpha 1, beta 0 is the identity (rebuilding from C alone would also drop the OD off the
   stains' plane). A crop whose stain cannot be estimated (not H&E, too little tissue) is
   left as it is.
3. HED stain perturbation in optical density (Tellez et al. 2018): OD = -ln(max(rgb, 1e-6)),
   HED = OD @ hed_from_rgb (Ruifrok-Johnston, as ``skimage.color.rgb2hed``), then
   alpha * HED + beta per stain channel and back. HED and beta are in OD units, i.e.
   ``rgb2hed`` without its division by -ln(1e-6), as in the original recipe.
4. colour jitter: brightness, contrast (towards the crop's mean grey), saturation, and
   hue as a rotation of the chroma plane in YIQ space. All three are linear, so one 3x3
   matrix and an offset per row apply them together.
5. Gaussian blur with a per-row sigma (grouped separable convolution).
6. additive Gaussian noise, sigma on the [0, 1] scale.
7. random erasing of one rectangle, filled with the ImageNet mean colour ("nothing here").

Determinism: every scalar of a row is drawn with numpy on the CPU from a generator seeded
by (seed, image id, crop index, view) alone, always in the same order and number whatever
the settings, so a row's augmentation never depends on its batch, and switching one
operation off leaves the others' draws unchanged. Per-pixel fields (noise, elastic
displacement) come from a counter-based integer hash of (row key, pixel index) computed
on the device, so CPU and CUDA produce the same field for the same key. The Macenko
perturbation's draws come after the hash keys, so adding it left every earlier draw as it was.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from histoembed.core.config import IMAGENET_MEAN, AugmentSettings
from histoembed.inputs.pixels import HED_FROM_RGB, OD_EPS, RGB_FROM_HED
from histoembed.maths import stain

# RGB -> YIQ (NTSC); Y uses the luma weights torchvision's grayscale uses.
YIQ_FROM_RGB = np.array([[0.299, 0.587, 0.114],
                         [0.596, -0.274, -0.322],
                         [0.211, -0.523, 0.312]])
RGB_FROM_YIQ = np.linalg.inv(YIQ_FROM_RGB)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))  # torchvision RandomErasing's ratio range

_MASK32 = 0xFFFFFFFF
_N_UNIFORMS = 23   # scalars drawn per row; the layout is fixed (see draw_view_params)
_N_KEYS = 4        # 32-bit hash keys per row: elastic (2), noise (2)
_N_MACENKO = 5     # uniforms after the keys: Macenko perturbation (whether, alpha H and E, beta H and E)
_HASH_CHUNK = 1 << 18  # hashes per chunk of rows on a CPU


def stable_key(image_id: str) -> int:
    """A 64-bit key of an image id that is the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little")


def row_rng(seed: int, image_id: str, crop_index: int, view: int) -> np.random.Generator:
    """The generator of one view of one crop; its draws depend on these four values alone."""
    entropy = [seed % 2**64, stable_key(image_id), crop_index % 2**64, view % 2**64]
    return np.random.default_rng(entropy)


def to_device(values: np.ndarray, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host ``values`` on ``like``'s device (as ``dtype``), without making the host wait for the device.

    A plain copy to a GPU first waits for every queued kernel, so each drawn parameter would
    stall the host until the encoder's previous forward pass ended. Through pinned memory the
    copy is queued like a kernel, and the host draws and queues the next view meanwhile (the
    pinned block is not reused before its copy has run). The values are the same either way.
    """
    t = torch.from_numpy(np.ascontiguousarray(values))
    if dtype is not None:
        t = t.to(dtype)
    if like.device.type != "cuda":
        return t.to(like.device)
    return t.pin_memory().to(like.device, non_blocking=True)


# ---------------------------------------------------------------- per-row parameters

@dataclass(frozen=True)
class ViewParams:
    """The drawn parameters of a batch of rows (numpy, one entry per row)."""

    flip_h: np.ndarray            # bool [B]
    flip_v: np.ndarray            # bool [B]
    angle_deg: np.ndarray         # [B], counter-clockwise
    brightness: np.ndarray        # [B], factor
    contrast: np.ndarray          # [B], factor
    saturation: np.ndarray        # [B], factor
    hue: np.ndarray               # [B], fraction of a turn
    stain_alpha: np.ndarray       # [B, 3], per H, E, D
    stain_beta: np.ndarray        # [B, 3], OD units
    elastic: np.ndarray           # bool [B]
    blur: np.ndarray              # bool [B]
    blur_sigma: np.ndarray        # [B], pixels
    noise: np.ndarray             # bool [B]
    noise_sigma: np.ndarray       # [B], [0, 1] scale
    erase: np.ndarray             # bool [B]
    erase_area: np.ndarray        # [B], drawn fraction of the crop
    erase_box: np.ndarray         # int [B, 4]: top, left, height, width in pixels
    elastic_key: np.ndarray       # int64 [B, 2], 32-bit hash keys
    noise_key: np.ndarray         # int64 [B, 2]
    macenko: np.ndarray           # bool [B]
    macenko_alpha: np.ndarray     # [B, 2], per H, E: concentration scale
    macenko_beta: np.ndarray      # [B, 2], per H, E: concentration shift


def _between(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + u * (hi - lo)


def draw_view_params(image_ids: Sequence[str], crop_index: Sequence[int], views: Sequence[int],
                     settings: AugmentSettings, seed: int, height: int, width: int) -> ViewParams:
    """Draw every scalar of each row from its own generator, in a fixed layout.

    Each row takes ``_N_UNIFORMS`` uniforms, ``_N_KEYS`` keys and ``_N_MACENKO`` uniforms
    whatever the settings, so the draws of one operation never shift when another is switched off.
    """
    n = len(views)
    u = np.empty((n, _N_UNIFORMS))
    keys = np.empty((n, _N_KEYS), dtype=np.int64)
    m = np.empty((n, _N_MACENKO))
    for i, (image_id, crop, view) in enumerate(zip(image_ids, crop_index, views, strict=True)):
        rng = row_rng(seed, image_id, int(crop), int(view))
        u[i] = rng.random(_N_UNIFORMS)
        keys[i] = rng.integers(0, 2**32, size=_N_KEYS, dtype=np.int64)
        m[i] = rng.random(_N_MACENKO)
    s = settings
    column = iter(u.T)      # the layout: each next() is the next uniform of every row

    def take(k: int) -> np.ndarray:
        return np.stack([next(column) for _ in range(k)], axis=1)

    flip_h, flip_v = next(column) < s.flip_p, next(column) < s.flip_p
    angle_deg = _between(next(column), -s.rotation_deg, s.rotation_deg)
    brightness = _between(next(column), 1 - s.brightness, 1 + s.brightness)
    contrast = _between(next(column), 1 - s.contrast, 1 + s.contrast)
    saturation = _between(next(column), 1 - s.saturation, 1 + s.saturation)
    hue = _between(next(column), -s.hue, s.hue)
    stain_alpha, stain_beta = _between(take(3), *s.stain_alpha), _between(take(3), *s.stain_beta)
    elastic = (next(column) < s.elastic_p) & (s.elastic_alpha > 0)
    blur, blur_sigma = next(column) < s.blur_p, _between(next(column), *s.blur_sigma)
    noise, noise_sigma = next(column) < s.noise_p, _between(next(column), *s.noise_sigma)
    erase, erase_area = next(column) < s.erase_p, _between(next(column), *s.erase_scale)
    aspect = np.exp(_between(next(column), *ERASE_LOG_ASPECT))
    box_h = np.clip(np.round(np.sqrt(erase_area * height * width * aspect)), 1, height).astype(np.int64)
    box_w = np.clip(np.round(np.sqrt(erase_area * height * width / aspect)), 1, width).astype(np.int64)
    top = np.minimum(np.floor(next(column) * (height - box_h + 1)), height - box_h).astype(np.int64)
    left = np.minimum(np.floor(next(column) * (width - box_w + 1)), width - box_w).astype(np.int64)
    assert next(column, None) is None, "_N_UNIFORMS must match the layout"
    return ViewParams(
        flip_h=flip_h, flip_v=flip_v, angle_deg=angle_deg, brightness=brightness, contrast=contrast,
        saturation=saturation, hue=hue, stain_alpha=stain_alpha, stain_beta=stain_beta, elastic=elastic,
        blur=blur, blur_sigma=blur_sigma, noise=noise, noise_sigma=noise_sigma, erase=erase,
        erase_area=erase_area, erase_box=np.stack([top, left, box_h, box_w], axis=1),
        elastic_key=keys[:, 0:2], noise_key=keys[:, 2:4], macenko=m[:, 0] < s.macenko_p,
        macenko_alpha=_between(m[:, 1:3], *s.macenko_alpha), macenko_beta=_between(m[:, 3:5], *s.macenko_beta),
    )


# ---------------------------------------------------------------- counter-based random fields

def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons), a well-mixing permutation of 32-bit integers, in int64.

    Products of two 32-bit values can overflow int64 and wrap, but their low 32 bits, all
    that is kept, are exact on every device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def hash_bits(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Uniform 32-bit integers, int64 [B, n]: element i of row b hashes (keys[b], i).

    The counter runs with the row's own odd stride and offset, so two rows' streams are
    different sequences, not shifted copies of one.
    """
    index = torch.arange(n, device=keys.device, dtype=torch.int64)
    counter = (index[None, :] * (keys[:, 0:1] | 1) + keys[:, 1:2]) & _MASK32
    return _mix32(counter)


def hash_normal(keys: torch.Tensor, n: int) -> torch.Tensor:
    """N(0, 1), float32 [B, n], a pure function of (keys[b], i) on any device.

    Box-Muller on the two 16-bit halves of each hash: one hash gives two normals (|z| is
    at most 4.85, ample for pixel noise and displacement fields).
    """
    pairs = (n + 1) // 2
    # On a CPU a few rows at a time, so the int64 temporaries stay in cache.
    rows = max(1, _HASH_CHUNK // pairs) if keys.device.type == "cpu" else keys.shape[0]
    out = torch.empty((keys.shape[0], 2 * pairs), device=keys.device, dtype=torch.float32)
    for start in range(0, keys.shape[0], rows):
        bits = hash_bits(keys[start:start + rows], pairs)
        u1 = ((bits & 0xFFFF).to(torch.float32) + 0.5) * 2.0**-16
        u2 = ((bits >> 16).to(torch.float32) + 0.5) * 2.0**-16
        radius = torch.sqrt(-2.0 * torch.log(u1))
        theta = (2 * math.pi) * u2
        torch.mul(radius, torch.cos(theta), out=out[start:start + rows, :pairs])
        torch.mul(radius, torch.sin(theta), out=out[start:start + rows, pairs:])
    return out[:, :n]


def _gaussian_taps(sigma: np.ndarray, radius: int) -> np.ndarray:
    """Normalised 1-D Gaussian kernels, [len(sigma), 2 * radius + 1]."""
    t = np.arange(-radius, radius + 1)
    sigma = np.maximum(np.asarray(sigma, dtype=np.float64), 1e-6)[:, None]   # sigma 0: the identity
    k = np.exp(-(t[None, :] ** 2) / (2 * sigma**2))
    return k / k.sum(axis=1, keepdims=True)


def elastic_displacement(keys: torch.Tensor, height: int, width: int, alpha: float, sigma: float) -> torch.Tensor:
    """Displacement in pixels, [B, 2, H, W] (x, y): alpha x Gaussian(sigma) * U(-1, 1) noise.

    The Simard field is smooth at scale sigma, so it is computed on a grid of step
    f = floor(sigma / 2) pixels (sigma 7: step 3, 1/9 of the work) and upsampled
    bilinearly. Each coarse node stands for the f x f pixels around it: their summed
    U(-1, 1) noise has variance f^2 / 3, drawn here as a normal; smoothing with the
    Gaussian's taps at the coarse nodes (sigma / f, each tap 1/f^2 of the pixel kernel's
    mass in 2-D) then gives the field's variance, 1 / (12 pi sigma^2), alpha = 1. The
    noise covers a margin of three sigmas around the crop and is smoothed without padding,
    so the edges are as random as the middle.
    """
    step = max(1, int(sigma // 2))
    coarse_sigma = sigma / step
    radius = max(1, math.ceil(3 * coarse_sigma))
    nodes_h = -(-(height - 1) // step) + 1      # nodes at pixels 0, f, 2f, ... past the crop
    nodes_w = -(-(width - 1) // step) + 1
    h, w = nodes_h + 2 * radius, nodes_w + 2 * radius
    noise = hash_normal(keys, 2 * h * w).view(-1, 1, h, w)
    taps = to_device(_gaussian_taps(np.array([coarse_sigma]), radius), noise, noise.dtype)
    field = F.conv2d(noise, taps.view(1, 1, -1, 1))
    field = F.conv2d(field, taps.view(1, 1, 1, -1)).view(-1, 2, nodes_h, nodes_w)
    if step > 1:
        size = (step * (nodes_h - 1) + 1, step * (nodes_w - 1) + 1)
        field = F.interpolate(field, size=size, mode="bilinear", align_corners=True)
        field = field[:, :, :height, :width]
    return (alpha / (step * math.sqrt(3))) * field


# ---------------------------------------------------------------- the operations

def _warp(x: torch.Tensor, p: ViewParams, settings: AugmentSettings) -> torch.Tensor:
    """Rotation about the centre plus elastic displacement, in one bilinear resampling."""
    b, _, height, width = x.shape
    angle = np.deg2rad(p.angle_deg)
    cos, sin = np.cos(angle), np.sin(angle)
    # Output pixel -> input position in grid_sample's [-1, 1] units; the aspect terms keep
    # it a true rotation in pixels for non-square crops.
    theta = np.zeros((b, 2, 3))
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * height / width
    theta[:, 1, 0] = sin * width / height
    theta[:, 1, 1] = cos
    theta_t = to_device(theta, x, x.dtype)
    grid = F.affine_grid(theta_t, [b, 3, height, width], align_corners=False)
    rows = np.flatnonzero(p.elastic)
    if rows.size:
        keys = to_device(p.elastic_key[rows], x)
        shift = elastic_displacement(keys, height, width, settings.elastic_alpha, settings.elastic_sigma)
        to_grid_units = to_device(np.array([2.0 / width, 2.0 / height]), x, x.dtype)
        idx = to_device(rows, x)
        grid[idx] += shift.permute(0, 2, 3, 1) * to_grid_units
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _stain_matrices(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row M, c with OD' = M @ OD + c (column vectors) for HED' = alpha * HED + beta."""
    m = np.einsum("ij,bj,jk->bki", HED_FROM_RGB, alpha, RGB_FROM_HED)  # (H diag(alpha) R)^T
    c = beta @ RGB_FROM_HED
    return m, c


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] rgb in [0, 1] -> stain densities H, E, D in OD units.

    ``skimage.color.rgb2hed(img) == max(rgb_to_hed(img) / -ln(1e-6), 0)``.
    """
    od = -torch.log(x.clamp_min(OD_EPS))
    hed = to_device(HED_FROM_RGB.T, x, x.dtype)  # columns act on channels
    return torch.einsum("ij,...jhw->...ihw", hed, od)


def _stain(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    b, _, height, width = x.shape
    m, c = _stain_matrices(p.stain_alpha, p.stain_beta)
    m_t = to_device(m, x, x.dtype)
    c_t = to_device(c, x, x.dtype)
    od = -torch.log(x.clamp_min(OD_EPS)).reshape(b, 3, -1)
    od = torch.baddbmm(c_t[:, :, None], m_t, od)
    return torch.exp(-od).clamp_(0, 1).view(b, 3, height, width)


def _macenko(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Each crop's Macenko concentrations times alpha plus beta, per stain; crops without an estimate as they are."""
    b, _, height, width = x.shape
    est = stain.estimate(x)
    od = stain.optical_density(x)                                                  # [B, 3, N]
    conc = torch.linalg.pinv(est.he) @ od                                          # [B, 2, N]
    alpha = to_device(p.macenko_alpha, x, od.dtype)[..., None]
    beta = to_device(p.macenko_beta, x, od.dtype)[..., None]
    out = stain.from_density(od + est.he @ (conc * (alpha - 1) + beta), x.shape).to(x.dtype)
    return torch.where(est.ok.view(b, 1, 1, 1), out, x)


def _jitter_matrices(p: ViewParams) -> tuple[np.ndarray, np.ndarray]:
    """Per-row T and g: the jittered pixel is T @ rgb + g * mean_luma(crop).

    Brightness b, contrast c towards the mean grey m and saturation s / hue h in YIQ
    compose to c b S(s, h) rgb + (1 - c) b m, because S maps grey to itself.
    """
    turn = 2 * math.pi * p.hue
    cos, sin = np.cos(turn), np.sin(turn)
    chroma = np.zeros((len(turn), 3, 3))
    chroma[:, 0, 0] = 1
    chroma[:, 1, 1] = chroma[:, 2, 2] = p.saturation * cos
    chroma[:, 1, 2] = -p.saturation * sin
    chroma[:, 2, 1] = p.saturation * sin
    s = RGB_FROM_YIQ @ chroma @ YIQ_FROM_RGB
    gain = p.contrast * p.brightness
    return gain[:, None, None] * s, (1 - p.contrast) * p.brightness


def _jitter(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    b, _, height, width = x.shape
    t, g = _jitter_matrices(p)
    luma = to_device(YIQ_FROM_RGB[0], x, x.dtype)
    mean_luma = torch.einsum("c,bchw->b", luma, x) / (height * width)
    offset = to_device(g, x, x.dtype) * mean_luma
    flat = torch.bmm(to_device(t, x, x.dtype), x.reshape(b, 3, -1)) + offset[:, None, None]
    return flat.clamp_(0, 1).view(b, 3, height, width)


def _blur(x: torch.Tensor, p: ViewParams, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, one kernel per row, as a convolution grouped by channel."""
    b, _, height, width = x.shape
    radius = max(1, math.ceil(3 * max_sigma))   # from the settings: the same for every batch
    taps = to_device(_gaussian_taps(p.blur_sigma, radius), x, x.dtype)
    taps = taps.repeat_interleave(3, dim=0)     # [B * 3, K]: each row's kernel for R, G, B
    y = F.pad(x.reshape(1, b * 3, height, width), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, taps.view(b * 3, 1, -1, 1), groups=b * 3)
    y = F.conv2d(y, taps.view(b * 3, 1, 1, -1), groups=b * 3)
    return y.view(b, 3, height, width)


def _noise(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    b, c, height, width = x.shape
    keys = to_device(p.noise_key, x)
    z = hash_normal(keys, c * height * width).view(b, c, height, width)
    sigma = to_device(p.noise_sigma, x, x.dtype)
    return (x + sigma[:, None, None, None] * z).clamp_(0, 1)


def _erase(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    b, _, height, width = x.shape
    box = to_device(p.erase_box, x)
    top, left, box_h, box_w = (box[:, i, None] for i in range(4))
    ys = torch.arange(height, device=x.device)[None, :]
    xs = torch.arange(width, device=x.device)[None, :]
    in_rows = (ys >= top) & (ys < top + box_h)        # [B, H]
    in_cols = (xs >= left) & (xs < left + box_w)      # [B, W]
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    fill = to_device(np.array(IMAGENET_MEAN), x, x.dtype).view(1, 3, 1, 1)
    return torch.where(mask, fill, x)


# ---------------------------------------------------------------- the batch

def _subset(p: ViewParams, rows: np.ndarray) -> ViewParams:
    return ViewParams(**{name: getattr(p, name)[rows] for name in ViewParams.__dataclass_fields__})


def _apply(x: torch.Tensor, p: ViewParams, rows: np.ndarray,
           op: Callable[[torch.Tensor, ViewParams], torch.Tensor]) -> torch.Tensor:
    """Run ``op`` on the rows that need it only; the others pass through untouched."""
    if rows.size == 0:
        return x
    if rows.size == x.shape[0]:
        return op(x, p)
    idx = to_device(rows, x)
    out = x.clone()
    out[idx] = op(x[idx], _subset(p, rows))
    return out


def augment_batch(x: torch.Tensor, image_ids: Sequence[str], crop_index: Sequence[int], views: Sequence[int],
                  settings: AugmentSettings, seed: int) -> torch.Tensor:
    """x: float32 [B,3,H,W] in [0,1] on any device -> same shape, device, dtype, clipped to [0,1].

    Rows with view 0 come back bit-identical; every other row is augmented as a function
    of (seed, image id, crop index, view) alone.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [B, 3, H, W], got {tuple(x.shape)}")
    if not (len(image_ids) == len(crop_index) == len(views) == x.shape[0]):
        raise ValueError("image_ids, crop_index and views need one entry per row of x")
    out = x.clone()
    rows = np.flatnonzero(np.asarray(views) != 0)
    if rows.size == 0:
        return out
    height, width = x.shape[2], x.shape[3]
    p = draw_view_params([image_ids[i] for i in rows], [crop_index[i] for i in rows],
                         [views[i] for i in rows], settings, seed, height, width)
    index = to_device(rows, x)
    y = x[index].contiguous()
    # Each operation skips rows whose drawn parameters make it the identity.
    warped = (p.angle_deg != 0) | p.elastic
    stained = np.any(p.stain_alpha != 1, axis=1) | np.any(p.stain_beta != 0, axis=1)
    macenko = p.macenko & (np.any(p.macenko_alpha != 1, axis=1) | np.any(p.macenko_beta != 0, axis=1))
    jittered = (p.brightness != 1) | (p.contrast != 1) | (p.saturation != 1) | (p.hue != 0)
    y = _apply(y, p, np.flatnonzero(p.flip_h), lambda v, q: v.flip(-1))  # exact permutations
    y = _apply(y, p, np.flatnonzero(p.flip_v), lambda v, q: v.flip(-2))
    y = _apply(y, p, np.flatnonzero(warped), lambda v, q: _warp(v, q, settings))
    y = _apply(y, p, np.flatnonzero(macenko), _macenko)
    y = _apply(y, p, np.flatnonzero(stained), _stain)
    y = _apply(y, p, np.flatnonzero(jittered), _jitter)
    y = _apply(y, p, np.flatnonzero(p.blur), lambda v, q: _blur(v, q, max(settings.blur_sigma)))
    y = _apply(y, p, np.flatnonzero(p.noise & (p.noise_sigma > 0)), _noise)
    y = _apply(y, p, np.flatnonzero(p.erase), _erase)
    out[index] = y.clamp(0, 1)
    return out
