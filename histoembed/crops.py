"""Cut square tissue crops from every image: the first stage, writing ``run/crops.parquet``.

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

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histoembed import qc
from histoembed.core import cpus, store
from histoembed.core.config import CropSettings, QCSettings
from histoembed.core.console import progress
from histoembed.core.errors import UserError
from histoembed.engines import local
from histoembed.inputs import slides
from histoembed.inputs.dataset import (
    MAX_PIXELS,
    Dataset,
    Problem,
    Sample,
    load_dataset,
    read_image_and_mask,
    read_slide_mask,
)
from histoembed.inputs.pixels import repair_ink, tissue_mask_by_colour

Box = tuple[int, int, int, int]   # x0, y0, x1, y1 in source pixels; x1, y1 exclusive
CROPS_VERSION = 2                 # bump when the crops' definition changes (part of the skip key)
SUMMARY_KEY = "histoembed_summary"  # footer metadata: what the run skipped and why


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
    binary, comps = region_components(rgb, mask, settings)
    has_mask = binary is not None and binary.any()
    paint = binary if (settings.fill_outside_mask and has_mask) else None
    boxes: list[tuple[Box, float]] = []
    side: int | None = None
    fallback = None
    measure = binary  # what tissue_fraction counts: the mask (or region) for blobs, tissue by colour for tiles
    if settings.strategy == "grid":
        measure = tissue_mask_by_colour(rgb)
        boxes, side = grid_boxes(measure, tile, settings.min_tissue, settings.max_crops), tile
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
            boxes, side = roi_window_boxes(binary, comps, tile, settings.max_crops), tile
        else:  # center
            boxes, side = center_boxes(binary, comps, tile), tile
        if not boxes:
            fallback = f"no {settings.strategy} crop is half inside the mask"
    strategy = settings.strategy
    if fallback is not None:
        if settings.strategy != "grid":
            measure = tissue_mask_by_colour(rgb)
        boxes = grid_boxes(measure, tile, settings.min_tissue, settings.max_crops, keep_best=True)
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


# ---------------------------------------------------------------- one image in a worker

@dataclass
class _CropJob:
    sample: Sample
    settings: CropSettings
    repair: dict | None  # QC settings to repair ink with, or None
    slide_mpp: float | None = None  # a slide's microns per pixel when its file does not say
    stamp: str | None = None        # a slide's content stamp (part of each patch's digest)


@dataclass
class _CroppedImage:
    key: tuple[str, str]  # (split, image_id)
    rows: list[tuple] = field(default_factory=list)  # (crop_index, x0, y0, x1, y1, fraction, strategy, scale, png)
    fallback: str | None = None
    problem: Problem | None = None
    repaired: bool = False


def _encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


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


def slide_tissue(sample: Sample, settings: CropSettings, slide_mpp: float | None = None) -> SlideTissue:
    """The slide's thumbnail at ``thumb_mpp`` and its tissue: found by saturation Otsu, or taken from the slide's
    mask (``mask_mode`` tissue ignores the mask, union adds the tissue found). What ``slide_patches`` lays its grid
    on, and what the report draws."""
    with slides.open_slide(sample.image) as slide:
        mpp0 = slides.base_mpp(slide, sample.image, slide_mpp)
        thumb, scale = slides.thumbnail(slide, sample.image, mpp0, settings.thumb_mpp)
        geo = slides.geometry(slide, mpp0, settings.mpp, settings.size)
        size0 = slide.dimensions
    thumb_mpp = mpp0 / scale
    given = read_slide_mask(sample, thumb.shape[:2]) if settings.mask_mode != "tissue" else None
    tissue = given
    if given is None or settings.mask_mode == "union":
        found = slides.tissue_by_saturation(thumb, thumb_mpp, settings.min_tissue_area)
        tissue = found if given is None else (given | found)
    return SlideTissue(thumb, scale, tissue, given is not None, geo, tuple(size0), mpp0)


def slide_patches(sample: Sample, settings: CropSettings, slide_mpp: float | None = None,
                  ) -> tuple[list[tuple[Box, float]], slides.Geometry, float]:
    """(patches as (level-0 box, tissue fraction), the geometry they are read with, the slide's own mpp).

    Tissue as ``slide_tissue`` finds it; a slide with no tissue is a UserError naming it.
    """
    t = slide_tissue(sample, settings, slide_mpp)
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


def _crop_slide(job: _CropJob) -> _CroppedImage:
    sample, settings = job.sample, job.settings
    try:
        boxes, geo, _ = slide_patches(sample, settings, job.slide_mpp)
    except UserError as e:
        return _CroppedImage(sample.key, problem=Problem(e.path or sample.image, f"{e.problem}; slide skipped"))
    source = str(Path(sample.image).resolve())
    rows = [(i, *b, f, "slide-grid", 1.0, None, geo.level, settings.mpp, source,
             patch_digest(job.stamp, geo.level, b, settings.size, settings.mpp))
            for i, (b, f) in enumerate(boxes)]
    return _CroppedImage(sample.key, rows)


def _crop_one(job: _CropJob) -> _CroppedImage:
    sample = job.sample
    if sample.slide:
        return _crop_slide(job)
    try:
        rgb, mask = read_image_and_mask(sample.image, sample.mask, max_pixels=None)  # checked by load_dataset
    except UserError as e:
        return _CroppedImage(sample.key,
                             problem=Problem(e.path or sample.image, f"{e.problem}; image skipped"))
    repaired = False
    if job.repair is not None:
        base = mask if mask is not None else np.full(rgb.shape[:2], 255, np.uint8)
        rgb, fixed = repair_ink(rgb, base, QCSettings.model_validate(job.repair))
        mask = fixed if mask is not None else None
        repaired = True
    crops, fallback = crop_image(rgb, mask, job.settings)
    rows = [(i, *c.box, c.tissue_fraction, c.strategy, c.scale, _encode_png(c.pixels)) for i, c in enumerate(crops)]
    return _CroppedImage(sample.key, rows, fallback, repaired=repaired)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process; OpenCV's own threads would oversubscribe


def _crop_alone(job: _CropJob) -> _CroppedImage:
    """``_crop_one`` in a process that runs one image at a time (a Ray task)."""
    _init_worker()
    return _crop_one(job)


@contextlib.contextmanager
def cropped_images(jobs: list[_CropJob], settings: CropSettings) -> Iterator[Iterator[_CroppedImage]]:
    """Every job's ``_crop_one`` result, in the jobs' order, by the engine ``settings`` name.

    local: worker processes of this machine (or this process); ray: one Ray task per image
    over a cluster. Either way each image goes through the same ``_crop_one``.
    """
    if settings.engine == "ray":
        from histoembed.engines import ray as ray_engine  # Ray: an optional extra, loaded only for this engine

        with ray_engine.session(settings.ray_address):
            yield ray_engine.map_ordered(_crop_alone, jobs)
        return
    with local.map_ordered(_crop_one, jobs, n_workers(settings.workers), _init_worker) as results:
        yield results


# ---------------------------------------------------------------- the stage

@dataclass
class CropsResult:
    path: Path
    images: int                       # images that got crops
    crops: int
    per_image: tuple[int, float, int]  # crops per image: min, median, max
    fallbacks: list[tuple[str, str, str]]  # (split, image_id, why) for images cut by grid-fallback
    problems: list[Problem]           # items skipped, with why (data checks and unreadable files)
    left_out: list[str]               # training images (names) left out because QC flagged them
    repaired: list[tuple[str, str]]   # (split, image_id) of images whose ink was repaired before cropping
    skipped: bool                     # True: inputs and settings unchanged, nothing was done
    warnings: list[str] = field(default_factory=list)  # e.g. a patient in both splits (leakage)


def _read_qc(run: Path, stamp: store.ContentStamps) -> tuple[dict[tuple[str, str], dict], dict | None, list | None]:
    """({(split, image_id): row}, QC settings as a dict, the file's stamp) of run/qc.parquet, if any."""
    table = store.read_qc(run)
    if table is None:
        return {}, None, None
    path = run / store.QC_FILE
    missing = [c for c in ("image_id", "split", "flagged", "ink") if c not in table.column_names]
    if missing:
        raise UserError(f"QC table lacks column(s) {', '.join(missing)}", path=path, hint="re-run `histoembed qc`")
    rows = {(r["split"], r["image_id"]): r for r in table.select(["image_id", "split", "flagged", "ink"]).to_pylist()}
    meta = store.read_meta(path)
    return rows, meta.get("settings"), [stamp(path), meta.get("key")]


def _summary(path: Path) -> dict:
    raw = (pq.ParquetFile(path).metadata.metadata or {}).get(SUMMARY_KEY.encode())
    return json.loads(raw) if raw else {}


def _counts(keys: Sequence[str]) -> tuple[int, float, int]:
    """Crops per image (min, median, max) from one ``split/image_id`` key per crop."""
    if not len(keys):
        return (0, 0.0, 0)
    _, n = np.unique(np.asarray(keys, dtype=object), return_counts=True)
    return int(n.min()), float(np.median(n)), int(n.max())


def _previous(out: Path) -> CropsResult:
    t = pq.read_table(out, columns=["image_id", "split"])
    keys = store.image_keys(t["split"].to_pylist(), t["image_id"].to_pylist())
    sm = _summary(out)
    return CropsResult(out, len(set(keys)), len(keys), _counts(keys), [tuple(f) for f in sm.get("fallbacks", [])],
                       [Problem(Path(p), why) for p, why in sm.get("problems", [])], sm.get("left_out", []),
                       [tuple(r) for r in sm.get("repaired", [])], skipped=True)


def n_workers(requested: int) -> int:
    """0 means every CPU this process may use (affinity and cgroup quota)."""
    return requested if requested > 0 else cpus.usable_cpus()


def _refuse_lost_classes(ds, samples: list[Sample], flagged: set[tuple[str, str]], data: Path) -> None:
    """Stop when a label given in the data has no training image left: a model would silently lack it."""
    kept = {s.label for s in samples if s.split == "train"}
    for label in ds.classes:
        if label in kept:
            continue
        n = sum(1 for s in ds.samples if s.label == label and s.key in flagged)
        why = (f"QC flagged all {n} of its usable image(s)" if n else
               "every image with this label was skipped by the data check")
        raise UserError(f"label {label!r} has no training image left to crop: {why}", path=data,
                        hint="pass --include-flagged (or --keep ID for some of them) to keep flagged images"
                        if n else "fix the problems listed for its images (run `histoembed crops --strict` "
                                  "to see the first)")


def _refuse_stale_qc(run: Path, stamps: list[list]) -> None:
    """Stop when an image or mask changed since QC checked it: its flags (and ink repairs) would describe
    other pixels, and a paste copied over a clean image would go into training unflagged."""
    path = run / store.QC_FILE
    if not path.exists():
        return
    changed = qc.changed_since(store.read_meta(path), [(sp, i, im, m) for sp, i, _, im, m in stamps])
    if changed:
        raise UserError(f"the data changed since `histoembed qc` checked it: {len(changed)} image(s) differ from "
                        f"the bytes QC flagged or were never checked ({_first(changed)})", path=path,
                        hint="run `histoembed qc`, then `histoembed crops` again")


def check_slide_mpp(samples: Sequence[Sample], slide_mpp: float | None) -> None:
    """Stop before any work when a slide does not say its microns per pixel and ``--slide-mpp`` is not given."""
    if slide_mpp:
        return
    for s in samples:
        if s.slide:
            with slides.open_slide(s.image) as slide:
                slides.base_mpp(slide, s.image)


def _first(names: Sequence[str], n: int = 5) -> str:
    """The first ``n`` names, comma-separated, with `...` when there are more."""
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def run_crops(data: Path, run: Path, settings: CropSettings, strict: bool = False, keep: Sequence[str] = (),
              include_flagged: bool = False, max_pixels: int = MAX_PIXELS, verify_data: bool = False,
              slide_mpp: float | None = None) -> CropsResult:
    """Cut the crops of both splits into ``run/crops.parquet`` (nothing to do when unchanged).

    ``strict`` stops at the first bad item, before anything is written. With a
    ``run/qc.parquet``, flagged training images are left out (unless ``include_flagged`` or
    named in ``keep``) and images with ink are repaired first; test images are never left out.
    The QC table must have checked the same image and mask bytes. ``verify_data`` hashes every
    file again instead of trusting the stamps cached by size and modification time.

    Whole slides (``Sample.slide``) get patches as coordinates (no pixels): a grid at ``settings.mpp`` over
    the tissue of a thumbnail; ``slide_mpp`` is the microns per pixel of slides whose file does not say.
    """
    data, run = Path(data), Path(run)
    out = run / store.CROPS_FILE
    store.remove_stale(run, ".*.tmp-*")  # what killed runs left
    ds = load_dataset(data, strict=strict, max_pixels=max_pixels)
    train_names = {s.image_id for s in ds.split("train")}
    unknown = [k for k in keep if k not in train_names]
    if unknown:
        raise UserError(f"--keep names image(s) not in the training data: {', '.join(unknown)}", path=data,
                        hint="use training image ids as in train_labels.csv or the manifest, e.g. img_0003.png "
                             "(test images are never left out)")
    stamp = store.ContentStamps(None if verify_data else store.read_meta(out).get("content_stamps"))
    stamps = sample_stamps(ds, stamp)
    _refuse_stale_qc(run, stamps)
    qc_rows, qc_settings, qc_stamp = _read_qc(run, stamp)
    repair_on = qc_settings is None or qc_settings.get("repair_ink", True)

    left_out = [s.image_id for s in ds.split("train")
                if qc_rows.get(s.key, {}).get("flagged") and not include_flagged and s.image_id not in keep]
    dropped = {("train", name) for name in left_out}
    samples = [s for s in ds.samples if s.key not in dropped]
    if not samples:
        raise UserError("every image was left out (all training images flagged by QC and no test images)",
                        path=run / store.QC_FILE, hint="pass --include-flagged or --keep ID")
    _refuse_lost_classes(ds, samples, dropped, data)

    check_slide_mpp(samples, slide_mpp)
    key = store.stage_key(
        "crops", CROPS_VERSION, settings, sorted(keep), include_flagged, qc_stamp,
        stamps, [str(p) for p in ds.problems], slide_mpp if any(s.slide for s in samples) else None,
        [s.group for s in samples] if any(s.group for s in samples) else None,
    )
    old = store.read_meta(out) if out.exists() else {}
    if old.get("key") == key and old.get("schema") == store.SCHEMA:  # an older file is cut again
        result = _previous(out)
        result.warnings = ds.warnings
        return result

    stamp_of = {(sp, i): im for sp, i, _, im, _ in stamps}
    jobs = []
    for s in samples:
        ink = bool(qc_rows.get(s.key, {}).get("ink"))
        jobs.append(_CropJob(s, settings, (qc_settings or {}) if (ink and repair_on and not s.slide) else None,
                             slide_mpp, stamp_of.get(s.key)))
    label_of = {s.key: s.label for s in samples}
    group_of = {s.key: s.group for s in samples}
    has_slides, has_groups = any(s.slide for s in samples), any(s.group for s in samples)

    meta = {"key": key, "settings": settings.model_dump(), "data": str(data.resolve()),
            "data_stamp": store.config_key("data", stamps), "qc": qc_stamp[1] if qc_stamp else None,
            "images": len(samples), "left_out": len(left_out), "classes": ds.classes, "content_stamps": stamp.used,
            "slides": sum(s.slide for s in samples), "slide_mpp": slide_mpp}
    schema = store.with_meta(store.crops_schema(has_slides, has_groups), meta)
    fallbacks: list[tuple[str, str, str]] = []
    problems: list[Problem] = list(ds.problems)
    repaired: list[tuple[str, str]] = []
    written: list[str] = []  # split/image_id of every crop written
    batch: list[tuple] = []

    def flush(writer: pq.ParquetWriter) -> None:
        if batch:
            cols = list(zip(*batch))
            writer.write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, schema)],
                                                    schema=schema))
            batch.clear()

    with store.atomic_path(out) as tmp:
        writer = pq.ParquetWriter(tmp, schema, compression="zstd")
        try:
            with cropped_images(jobs, settings) as results, progress("images") as bar:
                bar_id = bar.add_task("crops", total=len(jobs))
                for done in results:
                    bar.advance(bar_id)
                    if done.problem is not None:
                        if strict:
                            raise UserError(f"{done.problem.problem.removesuffix('; image skipped')} "
                                            "(--strict: nothing written)", path=done.problem.path)
                        problems.append(done.problem)
                        continue
                    split, image_id = done.key
                    if done.fallback is not None:
                        fallbacks.append((split, image_id, done.fallback))
                    if done.repaired:
                        repaired.append(done.key)
                    for row in done.rows:
                        if has_slides and len(row) == 9:  # a flat image's row: no slide columns
                            row = (*row, None, None, None, None)
                        elif not has_slides:
                            row = row[:9]
                        if has_groups:
                            row = (*row, group_of[done.key])
                        batch.append((image_id, split, label_of[done.key], *row))
                        written.append(f"{split}/{image_id}")
                    if len(batch) >= 256:
                        flush(writer)
            flush(writer)
            if not written:
                raise UserError("no image could be cropped", path=data,
                                hint="\n  ".join(map(str, problems[:20])) or None)
            writer.add_key_value_metadata({SUMMARY_KEY: json.dumps({
                "fallbacks": fallbacks, "problems": [[str(p.path), p.problem] for p in problems],
                "left_out": left_out, "repaired": repaired})})
        finally:
            writer.close()
    return CropsResult(out, len(set(written)), len(written), _counts(written), fallbacks, problems,
                       left_out, repaired, skipped=False, warnings=ds.warnings)


# ---------------------------------------------------------------- the data a run was cut from

def sample_stamps(ds: Dataset, stamp: store.ContentStamps) -> list[list]:
    """One [split, image_id, label, image content, mask content] per sample, in the dataset's order."""
    return [[s.split, s.image_id, s.label, stamp(s.image), stamp(s.mask)] for s in ds.samples]


def data_stamp(ds: Dataset, stamp: store.ContentStamps | None = None) -> str:
    """A key of every image, mask and label of ``ds`` by content, wherever the folder is: it changes when a
    file is added, removed or edited (a ``touch`` or a copy changes nothing)."""
    return store.config_key("data", sample_stamps(ds, stamp or store.ContentStamps()))


class DataChanged(UserError):
    """The data's files changed since the crops were cut: every stage after crops must stop, not only note it."""


def run_data(run: Path, data: Path | None = None, verify: bool = False) -> tuple[Path, Dataset]:
    """(data path, dataset) of the data ``run/crops.parquet`` was cut from (``data`` overrides the recorded path).

    Later stages (submit, predict, report) use it so a user who passed ``--data`` to ``crops`` is not
    asked again; they stop (:class:`DataChanged`) when the files changed since the crops were cut, since
    the crops, features and models would then describe other images. Files keep their cached stamps while
    their size and modification time are unchanged; ``verify`` hashes every file again.
    """
    run = Path(run)
    path = run / store.CROPS_FILE
    if not path.exists():
        raise UserError("crops file not found", path=path, hint="run `histoembed crops` first")
    meta = store.check_schema(path, "crops")
    if data is None:
        if not meta.get("data"):
            raise UserError("the crops file does not say which data folder it was cut from", path=path,
                            hint="pass --data, or re-run `histoembed crops`")
        data = Path(meta["data"])
        if not data.exists():
            raise UserError(f"the data the crops were cut from is gone: {data}", path=path,
                            hint="pass --data with its new place, or re-run `histoembed crops --data DIR`")
    ds = load_dataset(data)
    recorded = meta.get("data_stamp")
    cache = None if verify else meta.get("content_stamps")
    if recorded is not None and recorded != data_stamp(ds, store.ContentStamps(cache)):
        raise DataChanged(f"the files under {data} changed since `histoembed crops` cut {path.name} "
                        "(an image, mask or label was added, removed or edited)", path=data,
                        hint="re-run `histoembed crops` and the stages after it")
    return data, ds
