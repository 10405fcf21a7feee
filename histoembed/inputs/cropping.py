"""The crop recipe: where crops lie in an image and in a slide, and their pixels (pure, no files written).

``stages/crops.py`` runs it over a dataset; ``predict`` and the report cut and draw exactly the same crops.

Strategies (``CropSettings.strategy``):

* ``blobs`` (default, the reference recipe): binarise the mask with Otsu; take the
  8-connected components; keep up to ``k`` largest with area >= ``min_area``; grow each
  bounding box by ``margin`` (each edge moves out by margin x the box's width for left and
  right, x its height for top and bottom; rounded outward) and clip it to the image; place
  the box's pixels centred on a square canvas of side max(width, height) painted with the
  fill colour; resize to ``size``.
* ``grid``: tiles of side ``tile`` (default ``size``) laid evenly over the whole image, kept
  when at least ``min_tissue`` of the tile is tissue by colour.
* ``roi-window``: tiles laid evenly over each kept component's bounding box, kept when at
  least half the tile is inside the mask.
* ``center``: one ``tile``-sided crop centred on each kept component's centroid.

An image whose mask is empty, missing, or yields no component of ``min_area`` (or whose
strategy yields no crop) falls back to grid tiles over its tissue found by colour; such
crops say ``grid-fallback`` in the ``strategy`` column and the result lists the images.
If no tile reaches ``min_tissue``, the tile with the most tissue is kept, so every
readable image gets at least one crop.

``tissue_fraction`` is the share of the crop's box that is tissue: inside the mask for
``blobs``, ``roi-window`` and ``center``, tissue by colour for ``grid`` and fallbacks.
Tiles never leave the image; an image smaller than a tile gives one clipped tile, padded
square with the fill colour (never stretched).

Mask mode (``mask_mode``): the components come from the given mask (``given``), from tissue
found by colour (``tissue``, the same detector as QC's and the grid's) or from both (``union``:
the mask's components first, then components of the tissue the mask leaves out, up to ``k``
together), so a mask that covers only part of the tissue still yields crops from all of it;
``min_area`` applies alike. Without a mask file, ``union`` is ``tissue``.

Scales (``scales``): every crop is cut at scale 1 as above; each further scale s cuts, for
every scale-1 crop, the square the crop shows (side max(width, height), or the tile side)
grown s times about its centre, so the blob sits in the middle with its surroundings around
it; what lies beyond the image is the fill colour (the same square padding), and the result
is resized to ``size``. ``fill_outside_mask`` paints scale-1 crops only: context is the point
of a larger scale. The box of a context crop is the part of that square inside the image.

Crop identity across scales: ``crop_index`` stays unique per (split, image_id). With n
scale-1 crops, scale-1 crop i keeps index i (exactly as without scales, so its features and
augmentation draws are unchanged) and its crop at the j-th further scale (ascending) gets
index j * n + i. The ``scale`` column says which; a crops file without that column (written
before scales existed) holds scale-1 crops only and is read as such.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from histoembed.core import store
from histoembed.core.config import CropSettings
from histoembed.core.errors import UserError
from histoembed.inputs import artifacts, slides
from histoembed.inputs.dataset import Sample, read_slide_mask
from histoembed.inputs.pixels import tissue_mask_by_colour

Box = tuple[int, int, int, int]   # x0, y0, x1, y1 in source pixels; x1, y1 exclusive


# ---------------------------------------------------------------- pure geometry and pixels

@dataclass(frozen=True)
class Component:
    box: Box                       # tight bounding box
    area: int                      # pixels in the component
    centroid: tuple[float, float]  # (x, y)


def otsu_binarise(mask: np.ndarray) -> np.ndarray:
    """The mask as bool HxW, thresholded by Otsu (a constant mask is all-in if non-zero)."""
    mask = np.asarray(mask, dtype=np.uint8)
    lo, hi = int(mask.min(initial=0)), int(mask.max(initial=0))
    if lo == hi:
        return np.full(mask.shape, hi > 0, dtype=bool)
    t, _ = cv2.threshold(mask, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask > t


def components(binary: np.ndarray, k: int, min_area: int) -> list[Component]:
    """Up to ``k`` largest 8-connected components of area >= ``min_area`` (largest first)."""
    pixels = binary.view(np.uint8) if binary.dtype == bool else binary.astype(np.uint8)
    # Only the box around every foreground pixel is labelled, from an even corner so that OpenCV's 2x2 blocks
    # fall where they would on the whole image; BBDT gives the same labels, areas, boxes and centroids as the
    # default (Spaghetti), several times faster with statistics on large masks.
    bx, by, bw, bh = cv2.boundingRect(pixels)
    if bw == 0 or bh == 0:
        return []
    ox, oy = bx - bx % 2, by - by % 2
    n, _, stats, centroids = cv2.connectedComponentsWithStatsWithAlgorithm(
        np.ascontiguousarray(pixels[oy:by + bh, ox:bx + bw]), 8, cv2.CV_32S, cv2.CCL_BBDT)
    found = []
    for i in range(1, n):  # 0 is the background
        x, y, w, h, area = (int(v) for v in stats[i])
        if area >= min_area:
            # OpenCV's centroid is (sum of x) / area in doubles; the sum is an exact integer, so the whole
            # image's centroid is rebuilt to the bit from the box's: (sum in the box + area x offset) / area.
            cx, cy = (float(c) for c in centroids[i])
            centroid = ((round(cx * area) + area * ox) / area, (round(cy * area) + area * oy) / area)
            found.append(Component((x + ox, y + oy, x + ox + w, y + oy + h), area, centroid))
    found.sort(key=lambda c: (-c.area, c.box[1], c.box[0]))
    return found[:k]


def grow_box(box: Box, margin: float, width: int, height: int) -> Box:
    """Move each edge out by margin x the box's width (left/right) or height (top/bottom); clip."""
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    return (max(0, math.floor(x0 - dx)), max(0, math.floor(y0 - dy)),
            min(width, math.ceil(x1 + dx)), min(height, math.ceil(y1 + dy)))


def square_crop(rgb: np.ndarray, box: Box, fill: Sequence[int], size: int, mask: np.ndarray | None = None,
                side: int | None = None) -> np.ndarray:
    """The box's pixels centred on a square canvas painted ``fill``, resized to ``size`` x ``size``.

    ``mask`` (bool HxW of the whole image), when given, also paints the box's pixels outside
    it. ``side`` is the canvas side (default max(width, height)); tiles pass their nominal
    side so a tile clipped by the image edge is padded, not stretched.
    """
    x0, y0, x1, y1 = box
    patch = rgb[y0:y1, x0:x1]
    h, w = patch.shape[:2]
    side = max(w, h, side or 0)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = np.asarray(fill, np.uint8)
    oy, ox = (side - h) // 2, (side - w) // 2
    if mask is None:
        canvas[oy:oy + h, ox:ox + w] = patch
    else:
        np.copyto(canvas[oy:oy + h, ox:ox + w], patch, where=mask[y0:y1, x0:x1, None])
    if side == size:
        return canvas
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(canvas, (size, size), interpolation=interp)


def context_window(box: Box, side: int, scale: float) -> Box:
    """The square of side ``scale`` x ``side`` centred on ``box``'s centre; it may reach beyond the image."""
    x0, y0, x1, y1 = box
    grown = max(1, round(scale * side))
    left, top = math.floor((x0 + x1 - grown) / 2), math.floor((y0 + y1 - grown) / 2)
    return left, top, left + grown, top + grown


def window_crop(rgb: np.ndarray, window: Box, fill: Sequence[int], size: int) -> tuple[Box, np.ndarray]:
    """(the window's part inside the image, the window's pixels with ``fill`` beyond the image, resized)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = window
    inside = (max(0, x0), max(0, y0), min(w, x1), min(h, y1))
    side = x1 - x0
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = np.asarray(fill, np.uint8)
    ix0, iy0, ix1, iy1 = inside
    if ix1 > ix0 and iy1 > iy0:
        canvas[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = rgb[iy0:iy1, ix0:ix1]
    if side != size:
        canvas = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)
    return inside, canvas


def box_fraction(binary: np.ndarray, box: Box) -> float:
    """Share of the box's pixels that are true in ``binary``."""
    x0, y0, x1, y1 = box
    part = binary[y0:y1, x0:x1]
    return float(part.mean()) if part.size else 0.0


def tile_starts(lo: int, hi: int, tile: int, limit: int) -> list[int]:
    """Starts of tiles of side ``tile`` laid evenly to cover [lo, hi), kept inside [0, limit)."""
    span = hi - lo
    if limit <= tile:
        return [0]
    if span <= tile:
        return [min(max(0, (lo + hi) // 2 - tile // 2), limit - tile)]
    n = math.ceil(span / tile)
    starts = np.linspace(lo, hi - tile, n).round().astype(int)
    return [min(max(0, int(s)), limit - tile) for s in starts]


def tile_boxes(region: Box, tile: int, width: int, height: int) -> list[Box]:
    """Tiles covering ``region`` (clipped to the image when it is smaller than a tile)."""
    x0, y0, x1, y1 = region
    return [(x, y, min(x + tile, width), min(y + tile, height))
            for y in tile_starts(y0, y1, tile, height) for x in tile_starts(x0, x1, tile, width)]


def _best(scored: list[tuple[Box, float]], n: int) -> list[tuple[Box, float]]:
    """At most ``n`` boxes, the highest fractions first among equals kept in reading order."""
    if len(scored) <= n:
        return scored
    keep = sorted(range(len(scored)), key=lambda i: -scored[i][1])[:n]
    return [scored[i] for i in sorted(keep)]


# ---------------------------------------------------------------- strategies

def blob_boxes(binary: np.ndarray, comps: list[Component], margin: float) -> list[tuple[Box, float]]:
    """Each component's box grown by ``margin`` and clipped (the reference recipe)."""
    h, w = binary.shape
    out = []
    for c in comps:
        box = grow_box(c.box, margin, w, h)
        out.append((box, box_fraction(binary, box)))
    return out


def grid_boxes(tissue: np.ndarray, tile: int, min_tissue: float, max_crops: int,
               keep_best: bool = False) -> list[tuple[Box, float]]:
    """Tiles over the whole image with at least ``min_tissue`` tissue (``keep_best``: else the best one)."""
    h, w = tissue.shape
    scored = [(b, box_fraction(tissue, b)) for b in tile_boxes((0, 0, w, h), tile, w, h)]
    kept = [(b, f) for b, f in scored if f >= min_tissue]
    if not kept and keep_best:
        kept = [max(scored, key=lambda bf: bf[1])]
    return _best(kept, max_crops)


def roi_window_boxes(binary: np.ndarray, comps: list[Component], tile: int, max_crops: int) -> list[tuple[Box, float]]:
    """Tiles over each component's box, kept when at least half the tile is inside the mask."""
    h, w = binary.shape
    seen, out = set(), []
    for c in comps:
        for b in tile_boxes(c.box, tile, w, h):
            f = box_fraction(binary, b)
            if b not in seen and f >= 0.5:
                seen.add(b)
                out.append((b, f))
    return _best(out, max_crops)


def center_boxes(binary: np.ndarray, comps: list[Component], tile: int) -> list[tuple[Box, float]]:
    """One tile centred on each component's centroid, shifted to stay inside the image."""
    h, w = binary.shape
    out = []
    for c in comps:
        cx, cy = c.centroid
        x = 0 if w <= tile else min(max(0, round(cx - tile / 2)), w - tile)
        y = 0 if h <= tile else min(max(0, round(cy - tile / 2)), h - tile)
        box = (x, y, min(x + tile, w), min(y + tile, h))
        out.append((box, box_fraction(binary, box)))
    return out


@dataclass
class Crop:
    box: Box
    tissue_fraction: float
    strategy: str
    pixels: np.ndarray  # size x size x 3 uint8
    scale: float = 1.0


def region_components(rgb: np.ndarray, mask: np.ndarray | None, settings: CropSettings,
                      ) -> tuple[np.ndarray | None, list[Component]]:
    """(where blobs are looked for as bool HxW, its kept components), by ``mask_mode``.

    ``union`` keeps the mask's components first and fills the remaining of ``k`` with components of
    the tissue the mask leaves out: a plain pixel union would merge every blob into the section
    around it (the mask lies on tissue) and lose the crops the mask focuses on.
    """
    given = otsu_binarise(mask) if mask is not None else None
    if settings.mask_mode == "given":
        region = given
    else:
        tissue = tissue_mask_by_colour(rgb)
        region = tissue if settings.mask_mode == "tissue" or given is None else given | tissue
    if region is None or not region.any() or settings.strategy == "grid":
        return region, []
    if settings.mask_mode != "union" or given is None:
        return region, components(region, settings.k, settings.min_area)
    marked = components(given, settings.k, settings.min_area)
    room = settings.k - len(marked)
    return region, marked + (components(tissue & ~given, room, settings.min_area) if room > 0 else [])


def crop_image(rgb: np.ndarray, mask: np.ndarray | None, settings: CropSettings) -> tuple[list[Crop], str | None]:
    """Every crop of one image (scale 1 first, then each further scale), and why it fell back to
    grid-over-tissue (None if it did not)."""
    tile = settings.tile or settings.size
    limit = min(settings.max_crops, settings.max_patches or settings.max_crops)  # --max-patches holds for images too
    binary, comps = region_components(rgb, mask, settings)
    has_mask = binary is not None and binary.any()
    paint = binary if (settings.fill_outside_mask and has_mask) else None
    boxes: list[tuple[Box, float]] = []
    side: int | None = None
    fallback = None
    measure = binary  # what tissue_fraction counts: the mask (or region) for blobs, tissue by colour for tiles
    if settings.strategy == "grid":
        measure = tissue_mask_by_colour(rgb)
        boxes, side = grid_boxes(measure, tile, settings.min_tissue, limit), tile
        if not boxes:
            fallback = f"no tile has {settings.min_tissue:.0%} tissue"
    elif binary is None:
        fallback = "no mask"
    elif not has_mask:
        fallback = {"given": "mask is empty", "tissue": "no tissue found by colour"}.get(
            settings.mask_mode, "mask is empty and no tissue found by colour")
    elif not comps:
        fallback = f"no {'mask' if settings.mask_mode == 'given' else settings.mask_mode} component of " \
                   f"{settings.min_area} px or more"
    else:
        if settings.strategy == "blobs":
            boxes = blob_boxes(binary, comps, settings.margin)
        elif settings.strategy == "roi-window":
            boxes, side = roi_window_boxes(binary, comps, tile, limit), tile
        else:  # center
            boxes, side = center_boxes(binary, comps, tile), tile
        boxes = boxes[:limit]  # blobs and centres: the largest components first
        if not boxes:
            fallback = f"no {settings.strategy} crop is half inside the mask"
    strategy = settings.strategy
    if fallback is not None:
        if settings.strategy != "grid":
            measure = tissue_mask_by_colour(rgb)
        boxes = grid_boxes(measure, tile, settings.min_tissue, limit, keep_best=True)
        side, paint, strategy = tile, None, "grid-fallback"
    crops = [Crop(b, f, strategy, square_crop(rgb, b, settings.fill, settings.size, mask=paint, side=side))
             for b, f in boxes]
    for scale in settings.scales:
        if scale != 1.0:
            crops += context_crops(rgb, measure, boxes, side, scale, strategy, settings)
    return crops, fallback


def context_crops(rgb: np.ndarray, measure: np.ndarray, boxes: list[tuple[Box, float]], side: int | None,
                  scale: float, strategy: str, settings: CropSettings) -> list[Crop]:
    """The crop of each box at ``scale``: its square (side max(w, h), or ``side``) grown about its centre."""
    out = []
    for b, _ in boxes:
        window = context_window(b, max(b[2] - b[0], b[3] - b[1], side or 0), scale)
        inside, pixels = window_crop(rgb, window, settings.fill, settings.size)
        out.append(Crop(inside, box_fraction(measure, inside), strategy, pixels, scale))
    return out


# ---------------------------------------------------------------- slides

@dataclass
class SlideTissue:
    """What ``crops`` sees of a slide: its thumbnail, the tissue on it and how patches are read."""

    thumb: np.ndarray            # RGB thumbnail at about ``thumb_mpp``
    scale: float                 # thumbnail px per level-0 px
    tissue: np.ndarray           # bool, the thumbnail's shape
    given: bool                  # True: from the slide's mask (alone or with the tissue found)
    geo: slides.Geometry
    size0: tuple[int, int]       # level-0 width, height
    mpp0: float                  # the slide's microns per level-0 pixel
    marks: artifacts.ThumbnailArtifacts | None = None  # pen ink and the scanner's border on the thumbnail
    fold_cut: float = artifacts.FOLD_DEFAULT_SATURATION     # the slide's fold saturation (artifacts.fold_saturation)


def slide_tissue(sample: Sample, settings: CropSettings, slide_mpp: float | None = None,
                 force_mpp: bool = False) -> SlideTissue:
    """The slide's thumbnail at ``thumb_mpp`` and its tissue: found by saturation Otsu, or taken from the slide's
    mask (``mask_mode`` tissue ignores the mask, union adds the tissue found). What ``slide_patches`` lays its grid
    on, and what the report draws."""
    with slides.open_slide(sample.image) as slide:
        mpp0 = slides.base_mpp(slide, sample.image, slide_mpp, force_mpp)
        geo = slides.geometry(slide, mpp0, settings.mpp, settings.size, sample.image, settings.allow_upsample)
        thumb, scale = slides.thumbnail(slide, sample.image, mpp0, settings.thumb_mpp)
        size0 = slide.dimensions
    thumb_mpp = mpp0 / scale
    arts = artifacts.thumbnail_artifacts(thumb, thumb_mpp)
    given = (read_slide_mask(sample, thumb.shape[:2], settings.mask_classes or None)
             if settings.mask_mode != "tissue" else None)
    tissue = given
    if given is None or settings.mask_mode == "union":
        found = slides.tissue_by_saturation(artifacts.without_artifacts(thumb, arts), thumb_mpp,
                                            settings.min_tissue_area)
        tissue = found if given is None else (given | found)
    tissue = tissue & ~arts.excluded       # ink (with its margin) and the scanner's border are never tissue
    return SlideTissue(thumb, scale, tissue, given is not None, geo, tuple(size0), mpp0, arts,
                       artifacts.fold_saturation(thumb, tissue))


def slide_patches(sample: Sample, settings: CropSettings, slide_mpp: float | None = None, force_mpp: bool = False,
                  tissue: SlideTissue | None = None) -> tuple[list[tuple[Box, float]], slides.Geometry, float]:
    """(patches as (level-0 box, tissue fraction), the geometry they are read with, the slide's own mpp).

    Tissue as ``slide_tissue`` finds it (or ``tissue``, found already); a slide with no tissue is a UserError
    naming it.
    """
    t = tissue or slide_tissue(sample, settings, slide_mpp, force_mpp)
    w0, h0 = t.size0
    if min(w0, h0) < t.geo.side0:
        raise UserError(f"the slide is {w0}x{h0} level-0 px, smaller than one {settings.size}-px patch at "
                        f"{settings.mpp:g} um/px ({t.geo.side0} level-0 px at its {t.mpp0:.4g} um/px)",
                        path=sample.image, hint="use a finer --mpp or a smaller --size, or leave the slide out")
    if not t.tissue.any():
        raise UserError("no tissue found on the slide's thumbnail" if not t.given else "the slide's mask is empty",
                        path=sample.mask if t.given else sample.image,
                        hint="check the slide (a blank or out-of-focus scan?), or lower --min-tissue-area")
    boxes = slides.patch_grid(t.tissue, t.scale, t.size0, t.geo.side0, settings.overlap, settings.min_tissue,
                              settings.max_patches)
    if not boxes:
        raise UserError(f"no {settings.size}-px patch at {settings.mpp} um/px has {settings.min_tissue:.0%} tissue",
                        path=sample.image, hint="lower --min-tissue, or --mpp for smaller patches")
    return boxes, t.geo, t.mpp0


def patch_digest(stamp: str | None, level: int, box: Box, size: int, mpp: float) -> str:
    """A slide patch's identity: what its pixels depend on (the slide's bytes, level, box, size and mpp)."""
    return store.config_key("patch", stamp, level, list(box), size, round(float(mpp), 6))[:16]


SCORE_CHUNK = 256  # patches read at a time for their artifact scores


def score_patches(slide, path: Path, boxes: list[tuple[Box, float]], geo: slides.Geometry, settings: CropSettings,
                  fold_cut: float) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """Every patch of a slide read as ``embed`` reads it, scored (``artifacts.SCORE_COLUMNS``), and its flags
    judged against the slide's own patches (``artifacts.artifact_flags``). A read error names the slide."""
    rows = []
    try:
        for first in range(0, len(boxes), SCORE_CHUNK):  # neighbours read as one region (slides.read_patches)
            origins = [(x0, y0) for (x0, y0, _, _), _ in boxes[first:first + SCORE_CHUNK]]
            for rgb in slides.read_patches(slide, origins, geo.level, geo.side0, settings.size):
                rows.append(artifacts.score_patch(rgb, settings.mpp, fold_cut))
    except Exception as e:  # noqa: BLE001 - OpenSlideError on a corrupt tile
        raise UserError(f"slide cannot be read ({e})", path=path, hint="the slide is damaged or truncated; re-copy "
                        "it") from None
    scores = {k: np.array([r[k] for r in rows], np.float64) for k in artifacts.SCORE_COLUMNS}
    flags, _ = artifacts.artifact_flags(scores)
    return scores, flags
