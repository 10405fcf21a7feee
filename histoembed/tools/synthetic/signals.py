"""Planted crop problems: where the class signal lives (tumour, context ring) and masks that miss the tumour."""

from __future__ import annotations

from typing import Literal, get_args

import cv2
import numpy as np

from histoembed.inputs.pixels import tissue_mask_by_colour
from histoembed.tools.synthetic.render import E_OD, H_OD, tissue_image

# Where the class signal lives (``class_signal``): ``morphology`` is the table above. The others give every
# class the same tumour morphology (NEUTRAL_LABEL's) and put the class in a colour tint that even a tiny
# random test encoder sees: ``tumour`` inside the mask's blobs (where the default crops look), ``context``
# in a ring around each blob that lies outside every default crop (margin 0.1) and inside its scale-2 crop.
ClassSignal = Literal["morphology", "tumour", "context"]
CLASS_SIGNALS: tuple[str, ...] = get_args(ClassSignal)
NEUTRAL_LABEL = "Luminal B"
CLASS_TINT = {"HER2(+)": (90, 110, 210), "Luminal A": (80, 170, 100), "Luminal B": (210, 170, 60),
              "Triple negative": (170, 70, 60)}
TINT_STRENGTH = (0.3, 0.6)    # per image: how far the region moves towards its class's colour
RING = (0.2, 0.6)             # the context ring: from/to this share of the blob's longer side beyond its edge
DEFAULT_MARGIN = 0.1          # the crops stage's default margin, which the ring stays outside of


def tint(rgb: np.ndarray, region: np.ndarray, label: str, rng: np.random.Generator) -> np.ndarray:
    """``rgb`` with ``region`` moved towards ``label``'s colour by a strength drawn per image."""
    alpha = rng.uniform(*TINT_STRENGTH)
    colour = np.asarray(CLASS_TINT[label], np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    out = rgb.astype(np.float32)
    out[region] = (1 - alpha) * out[region] + alpha * colour
    return np.clip(out, 0, 255).astype(np.uint8)


def context_ring(mask: np.ndarray, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Bool HxW: around each mask blob, the band RING of its longer side beyond its edge, outside the mask
    and outside every blob's box grown by ``margin`` (so no scale-1 crop of the crops stage sees it)."""
    h, w = mask.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    ring = np.zeros((h, w), bool)
    boxes = np.zeros((h, w), bool)
    for i in range(1, n):
        x, y, bw, bh, _ = (int(v) for v in stats[i])
        side = max(bw, bh)
        dist = cv2.distanceTransform((labels != i).astype(np.uint8), cv2.DIST_L2, 5)
        ring |= (dist > RING[0] * side) & (dist <= RING[1] * side)
        dx, dy = int(np.ceil(margin * bw)), int(np.ceil(margin * bh))
        boxes[max(0, y - dy):y + bh + dy, max(0, x - dx):x + bw + dx] = True
    return ring & ~boxes & (mask == 0)


def partial_mask(rgb: np.ndarray, tumour: np.ndarray, rng: np.random.Generator,
                 margin: float = DEFAULT_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """(a mask that marks one patch of tissue away from the tumour, the tissue the mask misses).

    The missed tissue stops short of the patch's box grown by ``margin`` (and a little more), so a
    default crop of the patch sees none of it. An image without tissue away from the tumour gets an
    empty mask (the crops stage then falls back to tiles over its tissue).
    """
    h, w = tumour.shape
    side = min(h, w)
    tissue = tissue_mask_by_colour(rgb)
    dist = cv2.distanceTransform((tumour == 0).astype(np.uint8), cv2.DIST_L2, 5)
    far = tissue & (dist > 0.08 * side)
    patch = np.zeros((h, w), np.uint8)
    ys, xs = np.nonzero(far)
    if len(ys):
        i = int(rng.integers(len(ys)))
        r = max(4, round(side * rng.uniform(0.08, 0.14)))
        cv2.circle(patch, (int(xs[i]), int(ys[i])), r, 255, -1)
        patch[~far] = 0
    seen = np.zeros((h, w), bool)
    if patch.any():
        y, x = np.nonzero(patch)
        grow = margin + 0.05
        gx, gy = int(np.ceil(grow * (x.max() - x.min() + 1))), int(np.ceil(grow * (y.max() - y.min() + 1)))
        seen[max(0, y.min() - gy):y.max() + 1 + gy, max(0, x.min() - gx):x.max() + 1 + gx] = True
    return patch, tissue & ~seen


def signal_image(rng: np.random.Generator, width: int, height: int, label: str, class_signal: str = "morphology",
                 partial: bool = False, empty_mask: bool = False,
                 stains: tuple[np.ndarray, np.ndarray] = (H_OD, E_OD)) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tissue_image` with the class signal where ``class_signal`` puts it, and with ``partial`` a mask
    that misses the tumour (see CLASS_SIGNALS and :func:`partial_mask`)."""
    if class_signal not in CLASS_SIGNALS:
        raise ValueError(f"class_signal must be one of {CLASS_SIGNALS}")
    rgb, mask = tissue_image(rng, width, height, label if class_signal == "morphology" else NEUTRAL_LABEL,
                             stains=stains)
    if class_signal == "context":
        rgb = tint(rgb, context_ring(mask), label, rng)
    if partial:
        patch, missed = partial_mask(rgb, mask, rng)
        if class_signal == "tumour":    # the class shows in all the tissue the mask misses
            rgb = tint(rgb, missed, label, rng)
        mask = patch
    elif class_signal == "tumour":
        rgb = tint(rgb, mask > 0, label, rng)
    return rgb, (np.zeros_like(mask) if empty_mask else mask)

