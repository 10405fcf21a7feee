"""Whole-slide images: which files are slides, their microns per pixel, patches, thumbnails and tissue.

Slides are read with OpenSlide (``openslide-python`` and the ``openslide-bin`` wheel): Aperio
.svs, Hamamatsu .ndpi, MIRAX .mrxs, Leica .scn, Ventana .bif, generic tiled pyramidal TIFF and
DICOM WSI. A file is a slide when OpenSlide recognises a vendor format in it and it is not a
single-level generic TIFF (a plain TIFF stays an image, as before). Nothing here ever reads a
whole level: a patch is one ``read_region`` of the best level for its magnification, resized;
a thumbnail is read tile by tile and each tile resized into place.

The patch recipe, in one place (``read_patch``): ``read_region((x0, y0), level, (s, s))`` with
``s = round(side0 / level_downsample)``, the RGBA composited onto white (alpha-weighted, rounded),
then ``cv2.resize`` to ``size`` x ``size`` with ``INTER_AREA`` when shrinking and ``INTER_LINEAR``
when enlarging (no resize when ``s == size``).

Reading at OpenSlide's speed (issue 32; figures in docs/slides.md): OpenSlide's ARGB is read straight into
numpy (``read_rgb``, no PIL image and its copies), and neighbouring patches of a row whose level coordinates
are whole pixels are cut from one region read (``read_patches``), so the tiles they share are decoded and
painted once. Both give the very pixels of ``read_region`` patch by patch (tests/test_slides.py).

Handles: one ``OpenSlide`` per (process, slide), opened on first use (``SlideHandles``); a handle
opened before a fork is never used by the child.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide

from histoembed.core.errors import UserError

# Suffixes that are flat images for sure: never probed with OpenSlide.
FLAT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
THUMB_TILE = 2048  # level pixels read per thumbnail tile


def is_slide(path: str | Path) -> bool:
    """True when OpenSlide reads ``path`` as a whole slide (not a flat PNG/JPEG, not a one-level plain TIFF)."""
    path = Path(path)
    if path.suffix.lower() in FLAT_SUFFIXES or not path.exists():
        return False
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - an unreadable file is not a slide; the image reader names the problem
        return False
    if vendor is None:
        return False
    if vendor != "generic-tiff":
        return True
    try:
        with openslide.OpenSlide(str(path)) as s:
            return s.level_count > 1
    except Exception:  # noqa: BLE001
        return False


def open_slide(path: str | Path):
    """An ``OpenSlide`` handle, or a UserError naming the file when it cannot be opened."""
    path = Path(path)
    if not path.exists():
        raise UserError("slide not found", path=path)
    try:
        return openslide.OpenSlide(str(path))
    except Exception as e:  # noqa: BLE001 - OpenSlideError, OpenSlideUnsupportedFormatError, OSError
        raise UserError(f"unreadable or truncated slide ({e})", path=path,
                        hint="re-export or re-copy the slide, or remove it from the manifest") from None


# What scanners write at level 0: about 0.1-0.5 um/px (40x ~0.25, 20x ~0.5); 0.05 leaves room for oil-immersion
# scans, 20 for a slide saved at about 0.5x. Outside it, a stated scale is not a scale: a generic TIFF's resolution
# tags often hold a writer's default of 72 or 96 dpi (OpenSlide then reports 352.8 or 264.6 um/px), which means
# "unknown". Believing it makes every patch a box of a pixel or two, blown up to the patch size.
PLAUSIBLE_MPP = (0.05, 20.0)
DEFAULT_DPI = (72.0, 96.0, 150.0, 300.0, 600.0)  # writers' defaults, not measurements
UPSAMPLE_TOLERANCE = 0.10   # --mpp may be this much finer than the slide's own before it counts as enlarging
MIN_PATCH_PX0 = 8           # a patch is never read from a level-0 box smaller than this


def default_dpi(props) -> float | None:
    """The dpi of a generic TIFF's resolution tags when it is one of the writers' defaults, else None."""
    try:
        res, unit = float(props["tiff.XResolution"]), str(props.get("tiff.ResolutionUnit", "inch"))
    except (KeyError, ValueError):
        return None
    dpi = res * 2.54 if unit == "centimeter" else res
    return next((d for d in DEFAULT_DPI if abs(dpi - d) < 0.01 * d), None)


def stated_mpp(slide) -> tuple[float | None, str]:
    """(the slide's own microns per level-0 pixel, or None, and in words why it is not believed)."""
    props = slide.properties
    try:
        x, y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        return None, "slide has no microns per pixel (openslide.mpp-x/y missing from its properties)"
    if not (x > 0 and y > 0) or not math.isfinite(x + y):
        return None, f"slide says {x} x {y} microns per pixel"
    mpp = (x + y) / 2
    lo, hi = PLAUSIBLE_MPP
    if lo <= mpp <= hi:
        return mpp, ""
    dpi = default_dpi(props)
    why = f" (its TIFF resolution is {dpi:g} dpi, a writer's default that means 'unknown')" if dpi else ""
    return None, (f"slide says {mpp:.4g} microns per pixel, outside what scanners write ({lo:g}-{hi:g} um/px)"
                  f"{why}")


def base_mpp(slide, path: str | Path, fallback: float | None = None, force: bool = False) -> float:
    """Microns per level-0 pixel: the slide's own when it states a plausible one (``stated_mpp``), else
    ``fallback`` (``--slide-mpp``), else a UserError naming the slide. ``force`` puts ``fallback`` above the
    slide's own (``--force-slide-mpp``)."""
    if force and fallback:
        return float(fallback)
    own, why = stated_mpp(slide)
    if own is not None:
        return own
    if fallback:
        return float(fallback)
    raise UserError(why, path=path, hint="give the scanner's resolution with --slide-mpp MPP (e.g. 0.25 at 40x, "
                                         "0.5 at 20x); it applies to slides that do not state a plausible one")


@dataclass(frozen=True)
class Geometry:
    """Where the patches of one slide come from at a target mpp."""

    level: int            # pyramid level read
    side0: int            # patch side in level-0 pixels
    downsample: float     # the level's downsample

    @property
    def side_level(self) -> int:
        return read_side(self.side0, self.downsample)


def read_side(side0: int, downsample: float) -> int:
    """Pixels read at a level for a box of ``side0`` level-0 pixels."""
    return max(1, round(side0 / downsample))


def geometry(slide, mpp0: float, target_mpp: float, size: int, path: str | Path = "",
             allow_upsample: bool = False) -> Geometry:
    """The level and the level-0 patch side for patches of ``size`` px at ``target_mpp``.

    A ``target_mpp`` finer than the slide's own (beyond ``UPSAMPLE_TOLERANCE``) would enlarge every patch:
    refused unless ``allow_upsample``; a patch box under ``MIN_PATCH_PX0`` level-0 pixels is always refused.
    """
    factor = target_mpp / mpp0
    side0 = max(1, round(size * factor))
    if factor < 1 - UPSAMPLE_TOLERANCE and not allow_upsample:
        raise UserError(f"--mpp {target_mpp:g} is finer than the slide's own {mpp0:.4g} um/px: every {size}-px patch "
                        f"would be a {side0}-px box enlarged {1 / factor:.1f}x", path=Path(path),
                        hint=f"use --mpp {mpp0:.3g} or coarser, or --allow-upsample to enlarge anyway")
    if side0 < MIN_PATCH_PX0:
        raise UserError(f"a {size}-px patch at --mpp {target_mpp:g} is a {side0}-px box of the slide (at "
                        f"{mpp0:.4g} um/px): too few pixels to embed", path=Path(path),
                        hint="check the slide's microns per pixel (--slide-mpp), or use a coarser --mpp")
    level = slide.get_best_level_for_downsample(factor) if factor >= 1 else 0
    return Geometry(int(level), side0, float(slide.level_downsamples[level]))


def rgba_to_rgb(region) -> np.ndarray:
    """An RGBA PIL image (``read_region``'s) as HxWx3 uint8, composited onto white."""
    rgba = np.asarray(region)
    alpha = rgba[..., 3:4]
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.float32) / 255.0
    return (rgba[..., :3].astype(np.float32) * a + 255.0 * (1 - a)).round().astype(np.uint8)


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    interp = cv2.INTER_AREA if rgb.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interp)


# openslide-python's ctypes binding of ``openslide_read_region`` and its ARGB converter, where 1.3-1.4 keep them;
# without them ``read_rgb`` goes through PIL.
try:
    from openslide import _convert, lowlevel

    _RAW = (lowlevel._read_region, _convert.argb2rgba)
except (ImportError, AttributeError):
    _RAW = None

_UINT32_P = ctypes.POINTER(ctypes.c_uint32)


def read_rgb(slide, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
    """``rgba_to_rgb(slide.read_region((x0, y0), level, (w, h)))``, pixel for pixel, without PIL's copies.

    OpenSlide paints premultiplied ARGB into a numpy buffer; when every pixel is opaque (a slide's interior)
    it is only reordered to RGB, else it goes through openslide-python's own unpremultiply and ``rgba_to_rgb``.
    """
    osr = getattr(slide, "_osr", None)
    if _RAW is None or osr is None or sys.byteorder != "little":
        return rgba_to_rgb(slide.read_region((int(x0), int(y0)), int(level), (int(w), int(h))))
    read, argb2rgba = _RAW
    buf = np.zeros((int(h), int(w)), np.uint32)
    read(osr, buf.ctypes.data_as(_UINT32_P), int(x0), int(y0), int(level), int(w), int(h))
    if buf.min(initial=0xFFFFFFFF) >= 0xFF000000:  # alpha 255 everywhere: ARGB is RGB already
        return cv2.cvtColor(buf.view(np.uint8).reshape(int(h), int(w), 4), cv2.COLOR_BGRA2RGB)
    argb2rgba(buf)
    return rgba_to_rgb(buf.view(np.uint8).reshape(int(h), int(w), 4))


def read_patch(slide, x0: int, y0: int, level: int, side0: int, size: int) -> np.ndarray:
    """The patch whose box starts at level-0 (x0, y0) with side ``side0``, read at ``level``, as size x size RGB."""
    side = read_side(side0, float(slide.level_downsamples[level]))
    return resize_square(read_rgb(slide, x0, y0, level, side, side), size)


MAX_REGION = 4096  # level pixels across one region read for a row of neighbouring patches


def patch_runs(origins: list[tuple[int, int]], downsample: float, side0: int,
               max_width: int = MAX_REGION) -> list[tuple[int, int]]:
    """(first, end) of each run of consecutive patches read as one region: same row, each starting inside or
    at the end of the one before, whole level pixels (an integer shift of one region, so the same pixels), at
    most ``max_width`` level pixels across. A patch that fits none is a run of its own."""
    side = read_side(side0, downsample)
    runs, first = [], 0
    whole = [(x / downsample).is_integer() and (y / downsample).is_integer() for x, y in origins]
    for i in range(1, len(origins) + 1):
        if i < len(origins) and whole[i] and whole[first]:
            (fx, fy), (px, _), (x, y) = origins[first], origins[i - 1], origins[i]
            if y == fy and px < x <= px + side0 and round((x - fx) / downsample) + side <= max_width:
                continue
        runs.append((first, i))
        first = i
    return runs


def read_patches(slide, origins: list[tuple[int, int]], level: int, side0: int, size: int) -> np.ndarray:
    """``read_patch`` of each level-0 origin, as [N, size, size, 3], the same pixels: each run of neighbours
    (``patch_runs``) is read as one region and cut, so the tiles they share are decoded and painted once."""
    ds = float(slide.level_downsamples[level])
    side = read_side(side0, ds)
    out = np.empty((len(origins), size, size, 3), np.uint8)
    for first, end in patch_runs(origins, ds, side0):
        x0, y0 = origins[first]
        width = round((origins[end - 1][0] - x0) / ds) + side
        region = read_rgb(slide, x0, y0, level, width, side)
        for i in range(first, end):
            at = round((origins[i][0] - x0) / ds)
            out[i] = resize_square(region[:, at:at + side], size)
    return out


def read_patch_at(path: str | Path, handles: SlideHandles, x0: int, y0: int, level: int, side0: int,
                  size: int) -> np.ndarray:
    """``read_patch`` through this process's handle of ``path``; a read error names the slide."""
    return read_patches_at(path, handles, [(x0, y0)], level, side0, size)[0]


def read_patches_at(path: str | Path, handles: SlideHandles, origins: list[tuple[int, int]], level: int, side0: int,
                    size: int) -> np.ndarray:
    """``read_patches`` through this process's handle of ``path``; a read error names the slide."""
    slide = handles.get(path)
    try:
        return read_patches(slide, origins, level, side0, size)
    except Exception as e:  # noqa: BLE001 - OpenSlideError on a corrupt tile
        handles.drop(path)
        (x0, y0), more = origins[0], f" (or one of the {len(origins) - 1} after it)" if len(origins) > 1 else ""
        raise UserError(f"slide cannot be read at level {level}, box ({x0}, {y0}) side {side0}{more} ({e})",
                        path=Path(path), hint="the slide is damaged or truncated; re-copy it") from None


class SlideHandles:
    """One open ``OpenSlide`` per slide in this process (the most recent ``capacity``), never across a fork."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self.pid = os.getpid()
        self.open: OrderedDict[str, object] = OrderedDict()

    def get(self, path: str | Path):
        if os.getpid() != self.pid:  # a forked child: the parent's handles are not ours to use
            self.open, self.pid = OrderedDict(), os.getpid()
        key = str(path)
        if key in self.open:
            self.open.move_to_end(key)
            return self.open[key]
        slide = open_slide(key)
        self.open[key] = slide
        while len(self.open) > self.capacity:
            _, old = self.open.popitem(last=False)
            old.close()
        return slide

    def drop(self, path: str | Path) -> None:
        slide = self.open.pop(str(path), None)
        if slide is not None:
            slide.close()

    def close(self) -> None:
        for s in self.open.values():
            s.close()
        self.open.clear()


_PROCESS_HANDLES: SlideHandles | None = None


def process_handles() -> SlideHandles:
    """This process's slide handles (a new set in a forked or spawned child): each slide opened once per process,
    whichever reader asks (a DataLoader worker, a Ray task's process)."""
    global _PROCESS_HANDLES
    if _PROCESS_HANDLES is None or _PROCESS_HANDLES.pid != os.getpid():
        _PROCESS_HANDLES = SlideHandles()
    return _PROCESS_HANDLES


# ---------------------------------------------------------------- thumbnails and tissue

def thumbnail(slide, path: str | Path, mpp0: float, thumb_mpp: float) -> tuple[np.ndarray, float]:
    """(RGB thumbnail at about ``thumb_mpp`` microns per pixel, thumbnail pixels per level-0 pixel).

    Read tile by tile from the best level, so memory holds the thumbnail and one tile, never a level.
    """
    w0, h0 = slide.dimensions
    ds = max(1.0, thumb_mpp / mpp0)
    tw, th = max(1, math.ceil(w0 / ds)), max(1, math.ceil(h0 / ds))
    level = slide.get_best_level_for_downsample(ds)
    lds = float(slide.level_downsamples[level])
    lw, lh = slide.level_dimensions[level]
    scale = tw / w0  # thumbnail px per level-0 px
    out = np.full((th, tw, 3), 255, np.uint8)
    try:
        for ly in range(0, lh, THUMB_TILE):
            for lx in range(0, lw, THUMB_TILE):
                cw, ch = min(THUMB_TILE, lw - lx), min(THUMB_TILE, lh - ly)
                tile = rgba_to_rgb(slide.read_region((round(lx * lds), round(ly * lds)), level, (cw, ch)))
                x0, y0 = round(lx * lds * scale), round(ly * lds * scale)
                x1, y1 = min(tw, round((lx + cw) * lds * scale)), min(th, round((ly + ch) * lds * scale))
                if x1 > x0 and y1 > y0:
                    out[y0:y1, x0:x1] = cv2.resize(tile, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    except Exception as e:  # noqa: BLE001 - OpenSlideError on a corrupt or missing tile
        raise UserError(f"unreadable or truncated slide ({e})", path=Path(path),
                        hint="re-copy the slide, or remove it from the manifest") from None
    return out, scale


def tissue_by_saturation(rgb: np.ndarray, thumb_mpp: float, min_area_um2: float, closing_um: float = 16.0,
                         min_saturation: int = 20) -> np.ndarray:
    """Tissue on a thumbnail, the CLAM/TRIDENT recipe: saturation, median blur, Otsu (never below
    ``min_saturation``), closing, holes filled, components under ``min_area_um2`` dropped (bool HxW)."""
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    sat = cv2.medianBlur(sat, 5)
    t, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    binary = (sat > max(t, min_saturation)).astype(np.uint8)
    k = max(1, round(closing_um / thumb_mpp)) | 1
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    min_px = min_area_um2 / (thumb_mpp * thumb_mpp)
    filled = np.zeros_like(binary)
    keep = [c for c in contours if cv2.contourArea(c) >= min_px]
    if keep:
        cv2.drawContours(filled, keep, -1, 1, thickness=cv2.FILLED)  # filled: holes closed
    return filled.astype(bool)


def check_aspect(mask_size: tuple[int, int], path: Path, slide_size: tuple[int, int],
                 tolerance: float = 0.02) -> None:
    """A slide's mask may be at any level's size, but must have the slide's aspect (within ``tolerance``)."""
    (mw, mh), (w0, h0) = mask_size, slide_size
    if abs((mw / mh) / (w0 / h0) - 1) > tolerance:
        raise UserError(f"mask is {mw}x{mh} (aspect {mw / mh:.3f}) but its slide is {w0}x{h0} "
                        f"(aspect {w0 / h0:.3f}); a slide's mask must have the slide's aspect at some level",
                        path=path)


def mask_on_thumbnail(mask: np.ndarray, path: Path, slide_size: tuple[int, int], shape: tuple[int, int],
                      tolerance: float = 0.02) -> np.ndarray:
    """A slide's mask (HxW uint8 at any level's aspect) resized to the thumbnail ``shape`` as bool."""
    check_aspect((mask.shape[1], mask.shape[0]), path, slide_size, tolerance)
    small = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    lo, hi = int(small.min(initial=0)), int(small.max(initial=0))
    if lo == hi:
        return np.full(shape, hi > 0, bool)
    return small > (lo + hi) / 2


# ---------------------------------------------------------------- the patch grid

def patch_grid(tissue: np.ndarray, scale: float, slide_size: tuple[int, int], side0: int, overlap: float,
               min_tissue: float, max_patches: int) -> list[tuple[tuple[int, int, int, int], float]]:
    """Patches (box in level-0 px, tissue fraction) on a grid of step ``side0 * (1 - overlap)`` over the slide,
    kept when at least ``min_tissue`` of the box is tissue on the thumbnail (``scale``: thumbnail px per level-0
    px); at most ``max_patches`` (0: all), an evenly spaced subsample in reading order."""
    w0, h0 = slide_size
    step = max(1, round(side0 * (1 - overlap)))
    xs = np.arange(0, max(1, w0 - side0 + 1), step)
    ys = np.arange(0, max(1, h0 - side0 + 1), step)
    integral = cv2.integral(tissue.astype(np.uint8)).astype(np.int64)
    th, tw = tissue.shape

    def span(starts, limit):
        lo = np.clip(np.floor(starts * scale).astype(int), 0, limit - 1)
        hi = np.clip(np.ceil((starts + side0) * scale).astype(int), lo + 1, limit)
        return lo, hi

    xl, xh = span(xs, tw)
    yl, yh = span(ys, th)
    s = (integral[yh][:, xh] - integral[yl][:, xh] - integral[yh][:, xl] + integral[yl][:, xl])
    area = (yh - yl)[:, None] * (xh - xl)[None, :]
    frac = s / area
    iy, ix = np.nonzero(frac >= max(min_tissue, 1e-9))
    if max_patches and len(iy) > max_patches:
        pick = np.unique(np.linspace(0, len(iy) - 1, max_patches).round().astype(int))
        iy, ix = iy[pick], ix[pick]
    return [((int(xs[i]), int(ys[j]), int(xs[i]) + side0, int(ys[j]) + side0), float(frac[j, i]))
            for j, i in zip(iy, ix)]
