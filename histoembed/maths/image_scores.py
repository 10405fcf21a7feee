"""QC's scores of one image, without a model: colour fractions H&E does not make, flat areas, ink, tissue
and blank masks, and the square thumbnail of its tissue that the embedding pass reads.

H&E is pink and purple on a white slide; a pasted photograph or cartoon shows colours no H&E stain makes
(browns, yellows, greens, blues), near-black shadows, or large flat areas of one colour. The scores are
fractions of the pixels of a copy downscaled to ``MAX_SIDE``; :func:`colour_flags` turns them into QC's
flags with the reasons a reader can check.
"""

from __future__ import annotations

import cv2
import numpy as np

from histoembed.core.config import QCSettings
from histoembed.inputs.pixels import hue_in, ink_mask, to_hsv, tissue_mask_by_colour

MAX_SIDE = 512          # the colour pass works on images downscaled to this longest side


def downscale(rgb: np.ndarray, mask: np.ndarray | None = None, max_side: int = MAX_SIDE):
    """Shrink so the longest side is at most ``max_side`` (area averaging; masks by nearest)."""
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return rgb, mask
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    if mask is not None:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    return small, mask


def flat_fraction(rgb: np.ndarray, foreground: np.ndarray, window: int = 7, max_std: float = 1.5) -> float:
    """Share of the foreground in windows of (almost) one colour: cartoons and graphics, not tissue."""
    if not foreground.any():
        return 0.0
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mean = cv2.blur(gray, (window, window))
    sq = cv2.blur(gray * gray, (window, window))
    std = np.sqrt(np.maximum(sq - mean * mean, 0))
    return float(np.mean(std[foreground] <= max_std))


def colour_scores(rgb: np.ndarray, mask: np.ndarray | None, settings: QCSettings) -> dict[str, float]:
    """Every colour score of one image (already downscaled); fractions are of all pixels."""
    hue, sat, val = to_hsv(rgb)
    n = hue.size
    ink = ink_mask(rgb, settings)
    coloured = (sat >= settings.min_saturation) & (val >= settings.dark_value)
    plain = coloured & ~ink  # coloured pixels that are not ink
    green = plain & hue_in(hue, settings.green_hue)
    brown = coloured & hue_in(hue, settings.brown_hue)
    yellow = coloured & hue_in(hue, settings.yellow_hue)
    blue = coloured & hue_in(hue, settings.blue_hue)
    he = plain & hue_in(hue, settings.tissue_hue)
    tissue = tissue_mask_by_colour(rgb) & ~ink
    dark = val < settings.dark_value
    background = (sat < settings.min_saturation) & (val >= 200)
    scores = {
        "green_fraction": green.sum() / n,
        "brown_fraction": brown.sum() / n,
        "yellow_fraction": yellow.sum() / n,
        "blue_fraction": blue.sum() / n,
        "off_palette_fraction": (green | brown | yellow | blue).sum() / n,
        "he_share": he.sum() / max(int(plain.sum()), 1),
        "dark_fraction": dark.sum() / n,
        "flat_fraction": flat_fraction(rgb, ~background & ~dark),
        "ink_fraction": ink.sum() / n,
        "tissue_fraction": tissue.sum() / n,
        "mask_fraction": np.nan,
        "tissue_in_mask": np.nan,
    }
    if mask is not None:
        inside = mask > 0
        scores["mask_fraction"] = inside.sum() / n
        scores["tissue_in_mask"] = (tissue & inside).sum() / inside.sum() if inside.any() else 0.0
    return {k: float(v) for k, v in scores.items()}


def colour_flags(scores: dict[str, float], settings: QCSettings) -> tuple[bool, bool, bool, list[str]]:
    """(non_tissue, ink, blank, reasons) from :func:`colour_scores`."""
    reasons: list[str] = []
    why = []
    if scores["off_palette_fraction"] >= settings.non_tissue_fraction:
        why.append(f"{scores['off_palette_fraction']:.0%} of pixels in colours H&E does not make "
                   f"(brown {scores['brown_fraction']:.0%}, yellow {scores['yellow_fraction']:.0%}, "
                   f"green {scores['green_fraction']:.0%}, blue {scores['blue_fraction']:.0%}; "
                   f"limit {settings.non_tissue_fraction:.0%})")
    if scores["dark_fraction"] >= settings.max_dark_fraction:
        why.append(f"{scores['dark_fraction']:.0%} near-black pixels (limit {settings.max_dark_fraction:.0%})")
    if scores["flat_fraction"] >= settings.max_flat_fraction:
        why.append(f"{scores['flat_fraction']:.0%} of the picture in flat single-colour areas "
                   f"(limit {settings.max_flat_fraction:.0%})")
    if scores["ink_fraction"] >= settings.max_ink_fraction:
        why.append(f"{scores['ink_fraction']:.0%} of the picture is green (limit {settings.max_ink_fraction:.0%})")
    non_tissue = bool(why)
    if non_tissue:
        reasons.append("non_tissue: " + "; ".join(why))
    ink = scores["ink_fraction"] >= settings.ink_fraction and not non_tissue  # ink is a mark on tissue
    if ink:
        reasons.append(f"ink: {scores['ink_fraction']:.1%} green-ink pixels (limit {settings.ink_fraction:.1%})")
    if np.isnan(scores["mask_fraction"]):
        blank = scores["tissue_fraction"] < settings.min_tissue_in_mask
        if blank:
            reasons.append(f"blank: no mask and {scores['tissue_fraction']:.1%} tissue by colour "
                           f"(limit {settings.min_tissue_in_mask:.0%})")
    elif scores["mask_fraction"] == 0:
        blank = True
        reasons.append("blank: the mask is empty")
    else:
        blank = scores["tissue_in_mask"] < settings.min_tissue_in_mask
        if blank:
            reasons.append(f"blank: {scores['tissue_in_mask']:.1%} of the mask is tissue "
                           f"(limit {settings.min_tissue_in_mask:.0%})")
    return non_tissue, ink, blank, reasons


def tissue_box(mask: np.ndarray | None, tissue: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around the mask, else around tissue by colour, else the whole image."""
    for m in (mask > 0 if mask is not None else None, tissue):
        if m is not None and m.any():
            ys, xs = np.nonzero(m)
            return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    h, w = tissue.shape
    return 0, 0, w, h


def thumbnail(rgb: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The box padded to a square with white (slide background) and resized to size x size."""
    x0, y0, x1, y1 = box
    crop = rgb[y0:y1, x0:x1]
    h, w = crop.shape[:2]
    side = max(h, w)
    square = np.full((side, side, 3), 255, np.uint8)
    oy, ox = (side - h) // 2, (side - w) // 2
    square[oy:oy + h, ox:ox + w] = crop
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
