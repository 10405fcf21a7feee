"""Pixel rules shared by qc and crops: tissue by colour, green ink (find and repair), HSV helpers,
the stain vectors shared by the augmentations and the drift check, and crop PNG decoding.

They live below both stages so the two agree on what tissue and ink are, and neither
stage imports the other.
"""

from __future__ import annotations

import cv2
import numpy as np

from histoembed.core.config import QCSettings

# Ruifrok & Johnston's H&E-DAB stain vectors (rows: haematoxylin, eosin, DAB), as skimage.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
OD_EPS = 1e-6                      # rgb floor before the log, as skimage


def hue_in(hue: np.ndarray, rng: tuple[float, float]) -> np.ndarray:
    """Pixels whose OpenCV hue (0..180) lies in [lo, hi); lo > hi wraps through 180."""
    lo, hi = rng
    return (hue >= lo) & (hue < hi) if lo <= hi else (hue >= lo) | (hue < hi)


def to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV hue (0..180), saturation and value (0..255) of an RGB uint8 image."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    return hsv[..., 0], hsv[..., 1], hsv[..., 2]


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (0 when there are too few to split)."""
    if values.size < 16:
        return 0.0
    t, _ = cv2.threshold(values.reshape(-1, 1).astype(np.uint8), 0, 255,
                         cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t)


BAND_ROWS = 1024  # rows converted at a time: a big image's HSV copy and masks never exist whole


def tissue_mask_by_colour(rgb: np.ndarray) -> np.ndarray:
    """Stained pixels as bool HxW: not the bright, unsaturated slide background and not black.

    Computed band by band of rows (each pixel on its own, so the result is the same), so memory holds the
    mask and one band's HSV, not a second copy of a big image.
    """
    out = np.empty(rgb.shape[:2], bool)
    for y in range(0, rgb.shape[0], BAND_ROWS):
        _, sat, val = to_hsv(rgb[y:y + BAND_ROWS])
        out[y:y + BAND_ROWS] = ((sat >= 20) | (val < 200)) & (val >= 30)
    return out


def ink_mask(rgb: np.ndarray, settings: QCSettings) -> np.ndarray:
    """Green-ink pixels: ink hue, saturation above Otsu's split of the ink-hue pixels.

    Otsu separates the saturated ink from faintly green-tinted tissue or background; the
    split never goes below ``ink_saturation`` so an image without ink finds none.
    """
    hue, sat, val = to_hsv(rgb)
    candidate = hue_in(hue, settings.green_hue) & (sat >= settings.min_saturation) & (val >= settings.dark_value)
    if not candidate.any():
        return candidate
    cut = max(otsu_threshold(sat[candidate]), float(settings.ink_saturation))
    return candidate & (sat > cut)


def repair_ink(rgb: np.ndarray, mask: np.ndarray, settings: QCSettings) -> tuple[np.ndarray, np.ndarray]:
    """Inpaint green ink from the surrounding pixels and remove it from the mask.

    Works on full-resolution arrays and returns new arrays (the inputs, like the source
    files, are left as they are). The ink mask grows by 2 px to take the smear's soft edge.
    """
    ink = ink_mask(rgb, settings)
    if not ink.any():
        return rgb.copy(), mask.copy()
    grown = cv2.dilate(ink.astype(np.uint8), np.ones((5, 5), np.uint8))
    repaired = cv2.inpaint(np.ascontiguousarray(rgb), grown, 3, cv2.INPAINT_TELEA)
    new_mask = mask.copy()
    new_mask[grown > 0] = 0
    return repaired, new_mask


def decode_png(data: bytes) -> np.ndarray:
    """An RGB uint8 crop from the PNG bytes the crops stage wrote."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not a readable PNG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
