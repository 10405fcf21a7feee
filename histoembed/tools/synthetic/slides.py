"""A synthetic cohort of whole-slide images (pyramidal, tiled, JPEG), for the demo, the tests and the benchmarks.

Each slide is an Aperio-like SVS written with ``tifffile`` (or, with ``fmt="tiff"``, a generic
tiled pyramidal TIFF with zlib tiles and its resolution in the TIFF tags): 256 x 256 JPEG tiles,
three levels (downsamples 1, 4, 16; level 0 carries the description ``Aperio Image Library
...|MPP = 0.25`` as a scanner writes it, subfiletype 0, smaller levels subfiletype 1). OpenSlide
reads them as vendor ``aperio`` (``generic-tiff``) with ``openslide.mpp-x`` 0.25.

Pixels are drawn tile by tile from a coarse tissue field (a few blobs of pink stroma on white
glass), so memory stays at one tile whatever the slide's size. The class shows in the nuclei:
``benign`` slides have sparse small nuclei, ``malignant`` dense large darker ones (each slide's
values jittered). Patients (``group``) hold one or two slides of one class.

Layout written by :func:`make_slide_cohort`::

    out/slides/slide_000.svs ...     (or .tiff)
    out/manifest.csv                 image,mask,label,split,group
"""

from __future__ import annotations

import csv
import functools
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

from histoembed.core import cpus
from histoembed.core.store import atomic_path
from histoembed.engines.local import map_ordered

SLIDE_LABELS = ("benign", "malignant")
SLIDE_MPP = 0.25
DOWNSAMPLES = (1, 4, 16)
TILE = 256
FIELD = 64  # level-0 pixels per cell of the coarse tissue field
JPEG_QUALITY = 85
ZLIB_LEVEL = 6
# Tiles (all levels, all slides) from which worker processes pay for their start: a tile takes 1-3 ms,
# a spawned worker about a second to import its modules.
PARALLEL_TILES = 4000


def _pil_jpeg(data: np.ndarray, level: int | None = None, **_: object) -> bytes:
    """JPEG-encode one tile with Pillow (what every slide's tiles are encoded with, imagecodecs or not)."""
    buf = io.BytesIO()
    tile = np.ascontiguousarray(data).reshape(data.shape[-3:])
    Image.fromarray(tile).save(buf, format="JPEG", quality=int(level or 85))
    return buf.getvalue()


def _jpeg_ready() -> None:
    """tifffile wants an encoder for JPEG (compression 7) even when given encoded tiles; without the
    imagecodecs package it has none, so register Pillow's."""
    try:
        tifffile.TIFF.COMPRESSORS[7]
    except KeyError:
        tifffile.TIFF.COMPRESSORS._codecs[7] = _pil_jpeg


class SlideSpec:
    """Everything that decides one synthetic slide's pixels (a coarse tissue field and the nuclei look)."""

    def __init__(self, seed: int, width: int, height: int, label: str, blank: bool = False):
        rng = np.random.default_rng(seed)
        self.seed, self.width, self.height, self.label, self.blank = seed, width, height, label, blank
        fw, fh = -(-width // FIELD) + 1, -(-height // FIELD) + 1
        field = np.zeros((fh, fw), np.float32)
        if not blank:
            for _ in range(int(rng.integers(1, 4))):
                cx, cy = rng.uniform(0.25, 0.75) * fw, rng.uniform(0.25, 0.75) * fh
                ax, ay = rng.uniform(0.12, 0.3) * fw, rng.uniform(0.12, 0.3) * fh
                cv2.ellipse(field, (int(cx), int(cy)), (max(1, int(ax)), max(1, int(ay))),
                            float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
            noise = cv2.resize(rng.random((max(2, fh // 4), max(2, fw // 4))).astype(np.float32), (fw, fh))
            field = cv2.GaussianBlur(field, (0, 0), 1.5) * (0.7 + 0.6 * noise)
        self.field = field
        malignant = label == "malignant"
        self.density = (0.012 if malignant else 0.004) * rng.uniform(0.8, 1.25)  # nuclei per level-0 px^2 / 100
        self.radius_um = (3.2 if malignant else 2.0) * rng.uniform(0.85, 1.15)
        self.nucleus = np.array([70, 40, 120] if malignant else [110, 70, 150], np.float32) * rng.uniform(0.9, 1.1)
        self.stroma = np.array([236, 160, 196], np.float32) + rng.normal(0, 6, 3)
        # stroma texture: waves of 10-60 um in level-0 coordinates, the same at every level
        self.waves = [(rng.uniform(0, 2 * np.pi), 2 * np.pi / rng.uniform(40, 240), rng.uniform(0, 2 * np.pi))
                      for _ in range(6)]

    def __reduce__(self):
        """Pickled as its arguments, not its field: a worker process rebuilds it once (cached)."""
        return _slide_spec, (self.seed, self.width, self.height, self.label, self.blank)

    def write_truth(self, slide_path: Path) -> Path | None:
        """What a test should know of the slide beyond its pixels, written beside it: nothing for a plain slide
        (``artifacts.ArtifactSlideSpec`` writes where its artifacts are)."""
        return None

    def tile(self, ds: int, x: int, y: int) -> np.ndarray:
        """The TILE x TILE pixels of the level with downsample ``ds`` whose top-left is level pixel (x, y).

        Every pixel is a function of (seed, ds, x, y) alone, so tiles can be drawn in any order or process.
        The arithmetic is that of one float blend of glass, stroma and nuclei over all three channels, done
        once where the channels agree (the glass) and skipped where its terms are exactly 0 or 1, so the
        pixels stay those of the plain blend while a tile costs about half as much.
        """
        steps = np.arange(TILE, dtype=np.float32)
        cols, rows = steps * ds + x * ds < self.width, steps * ds + y * ds < self.height
        outside = None if cols.all() and rows.all() else ~(rows[:, None] & cols[None, :])
        tissue = self._tissue(ds, x * ds, y * ds, steps, outside)
        rng = np.random.default_rng([self.seed, ds, x, y])
        glass = rng.standard_normal((TILE, TILE))   # the draws of rng.normal(0, 2), to the bit
        glass *= 2
        glass += 244
        glass = glass.astype(np.float32)              # the glass's grey, the same in every channel
        if tissue is not None:
            out = self._stain(tissue, glass, rng, ds, x * ds, y * ds)
        else:
            grey = np.clip(glass, 0, 255).astype(np.uint8)
            out = cv2.merge([grey, grey, grey])
        if outside is not None:
            out[outside] = 255
        return out

    def _tissue(self, ds: int, x0: int, y0: int, steps: np.ndarray, outside: np.ndarray | None) -> np.ndarray | None:
        """How much tissue covers each pixel (0-1, float32): the coarse field resampled to the tile's pixels,
        or None where none does (the field stays under the threshold all around the tile: nothing to resample).
        """
        span = TILE * ds
        fx, fy = x0 // FIELD, y0 // FIELD
        around = self.field[max(0, fy - 1):fy + span // FIELD + 2, max(0, fx - 1):fx + span // FIELD + 2]
        if around.size == 0 or around.max() < 0.34:   # interpolation never exceeds its neighbours
            return None
        m = np.float32([[span / FIELD / TILE, 0, x0 / FIELD], [0, span / FIELD / TILE, y0 / FIELD]])
        mx = np.ascontiguousarray(np.broadcast_to(m[0, 0] * steps + m[0, 2], (TILE, TILE)))
        my = np.ascontiguousarray(np.broadcast_to((m[1, 1] * steps + m[1, 2])[:, None], (TILE, TILE)))
        tissue = cv2.remap(self.field, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        tissue = np.clip((tissue - 0.35) * 4, 0, 1)
        if outside is not None:
            tissue[outside] = 0
        return tissue if tissue.any() else None

    def _stain(self, tissue: np.ndarray, glass: np.ndarray, rng: np.random.Generator, ds: int, x0: int,
               y0: int) -> np.ndarray:
        """Textured stroma over the glass as far as ``tissue`` (0-1) covers it, then nuclei: RGB uint8."""
        gx = np.arange(TILE, dtype=np.float32) * ds + x0
        gy = np.arange(TILE, dtype=np.float32) * ds + y0
        texture = np.zeros((TILE, TILE), np.float32)
        wave, cross = np.empty((TILE, TILE)), np.empty((TILE, TILE))
        for a, k, p in self.waves:  # sin(u + v) = sin u cos v + cos u sin v: outer products, not 65k sines
            u, v = np.cos(a) * k * gx, np.sin(a) * k * gy + p
            np.multiply.outer(np.cos(v), np.sin(u), out=wave)
            np.multiply.outer(np.sin(v), np.cos(u), out=cross)
            wave += cross
            texture += wave
        shade = 1 + 0.02 * texture
        covered = bool((tissue == 1).all())           # then glass * (1 - tissue) adds exactly 0
        under = None if covered else glass * (1 - tissue)
        planes = np.empty((3, TILE, TILE), np.uint8)
        for c in range(3):
            np.multiply(self.stroma[c], shade, out=wave)
            if under is not None:
                wave *= tissue
                wave += under
            np.clip(wave, 0, 255, out=wave)
            planes[c] = wave
        out = cv2.merge(list(planes))
        span = TILE * ds
        n = rng.poisson(self.density * span * span / 100 * float(tissue.mean()))
        r = max(1, round(self.radius_um / SLIDE_MPP / ds))
        nuclei = np.zeros((TILE, TILE), np.uint8)
        for px, py in rng.integers(0, TILE, (min(n, 20000), 2)):
            if tissue[py, px] > 0.5:
                cv2.circle(nuclei, (int(px), int(py)), r, 1, -1)
        out[nuclei.astype(bool)] = np.clip(self.nucleus, 0, 255).astype(np.uint8)
        return out


@functools.lru_cache(maxsize=8)
def _slide_spec(seed: int, width: int, height: int, label: str, blank: bool) -> SlideSpec:
    return SlideSpec(seed, width, height, label, blank)


def _levels(spec: SlideSpec, downsamples: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(downsample, width, height) of each level written: level 0, then the next while 64 px or more a side."""
    levels = []
    for i, ds in enumerate(downsamples):
        w, h = -(-spec.width // ds), -(-spec.height // ds)
        if i and min(w, h) < 64:
            break
        levels.append((ds, w, h))
    return levels


@dataclass(frozen=True)
class _Strip:
    """One row of tiles of one level of one slide, to draw and encode in a worker process."""

    spec: SlideSpec
    ds: int
    width: int                          # the level's width, px
    y: int                              # the row's top, level px
    fmt: str


def _draw_strip(strip: _Strip) -> list[bytes]:
    """The row's tiles, left to right, encoded as the slide's format stores them."""
    tiles = (strip.spec.tile(strip.ds, x, strip.y) for x in range(0, strip.width, TILE))
    if strip.fmt == "svs":
        return [_pil_jpeg(tile, JPEG_QUALITY) for tile in tiles]
    return [zlib.compress(tile.tobytes(), ZLIB_LEVEL) for tile in tiles]


def _level_options(spec: SlideSpec, i: int, ds: int, fmt: str, mpp: float | None) -> dict:
    """tifffile's options for level ``i`` (downsample ``ds``): Aperio's description (svs) or TIFF resolution."""
    options: dict = dict(dtype=np.uint8, tile=(TILE, TILE), photometric="rgb", metadata=None,
                         subfiletype=0 if i == 0 else 1)
    if fmt == "svs":
        desc = (f"Aperio Image Library v12.0.0\r\n{spec.width}x{spec.height} [0,0 {spec.width}x{spec.height}] "
                f"({TILE}x{TILE}) JPEG/RGB Q={JPEG_QUALITY}")
        if i == 0 and mpp:
            desc += f"|AppMag = {40 if mpp <= 0.3 else 20}|MPP = {mpp}"
        options.update(compression="jpeg", compressionargs={"level": JPEG_QUALITY}, description=desc)
    else:
        options.update(compression="zlib")
        if mpp:
            per_cm = 1e4 / (mpp * ds)
            options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    return options


def write_slides(slides: list[tuple[Path, SlideSpec]], fmt: str = "svs", mpp: float | None = SLIDE_MPP,
                 downsamples: tuple[int, ...] = DOWNSAMPLES, workers: int | None = None) -> list[Path]:
    """Write each (path, spec) as a pyramidal tiled slide (``svs``: Aperio-like JPEG; ``tiff``: generic, zlib).

    Tiles are drawn and encoded a row at a time in ``workers`` processes (default: the usable CPUs when
    there are at least PARALLEL_TILES tiles, else this one) and written in order as they come, so
    memory holds a few rows whatever the slide's size, and the files do not depend on the processes.
    Each level is drawn from the spec at its own scale, not downsampled from level 0. A slide appears
    at its path only when complete.
    """
    _jpeg_ready()
    plan = [(path, spec, _levels(spec, downsamples)) for path, spec in slides]
    strips = [_Strip(spec, ds, w, y, fmt) for _, spec, levels in plan for ds, w, h in levels
              for y in range(0, h, TILE)]
    if workers is None:
        tiles = sum(-(-s.width // TILE) for s in strips)
        workers = cpus.usable_cpus() if tiles >= PARALLEL_TILES else 1
    with map_ordered(_draw_strip, strips, workers) as drawn:
        rows = iter(drawn)
        for path, spec, levels in plan:
            with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=spec.width * spec.height > 2**31) as tw:
                for i, (ds, w, h) in enumerate(levels):
                    tw.write(_tiles(rows, -(-h // TILE)), shape=(h, w, 3), **_level_options(spec, i, ds, fmt, mpp))
    return [path for path, _ in slides]


def _tiles(rows: Iterator[list[bytes]], n_rows: int) -> Iterator[bytes]:
    """The next ``n_rows`` rows' encoded tiles, one by one (tifffile takes exactly a level's tiles)."""
    for _ in range(n_rows):
        yield from next(rows)


def write_slide(path: Path, spec: SlideSpec, fmt: str = "svs", mpp: float | None = SLIDE_MPP,
                downsamples: tuple[int, ...] = DOWNSAMPLES) -> Path:
    """Write ``spec`` as a pyramidal tiled slide (``svs``: Aperio-like JPEG; ``tiff``: generic, zlib)."""
    return write_slides([(Path(path), spec)], fmt, mpp, downsamples)[0]


def make_slide_cohort(out: Path, n: int = 12, seed: int = 0, size: int = 20000, n_test: int | None = None,
                      fmt: str = "svs", spec_type: type[SlideSpec] | None = None) -> dict:
    """``n`` slides (about ``size`` px a side at level 0, 0.25 um/px) with labels and patients, and a manifest.

    About a quarter (at least 2) are test slides; training labels alternate between the classes so
    each has about half; patients hold one or two slides of one class and one split. ``spec_type``
    (``artifacts.ArtifactSlideSpec``: planted artifacts, their places beside each slide) draws them.
    """
    spec_type = spec_type or SlideSpec
    out = Path(out)
    rng = np.random.default_rng(seed)
    n_test = max(2, n // 4) if n_test is None else n_test
    n_test = min(n_test, max(0, n - 2))
    suffix = ".svs" if fmt == "svs" else ".tiff"
    rows, labels, patient, slides = [], {}, 0, []
    for i in range(n):
        split = "test" if i >= n - n_test else "train"
        label = SLIDE_LABELS[(i // 2) % 2] if split == "train" else SLIDE_LABELS[int(rng.integers(0, 2))]
        if i % 2 == 0 or split == "test" or (i // 2) % 3 == 2:  # pairs of slides, every third pair two patients
            patient += 1
        w = int(size * rng.uniform(0.85, 1.0))
        h = int(size * rng.uniform(0.7, 0.9))
        name = f"slides/slide_{i:03d}{suffix}"
        slides.append((out / name, spec_type(int(rng.integers(2**31)), w, h, label)))
        rows.append([name, "", label if split == "train" else "", split, f"patient_{patient:03d}"])
        labels[name] = label
    write_slides(slides, fmt)
    for path, spec in slides:
        spec.write_truth(path)
    with atomic_path(out / "manifest.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask", "label", "split", "group"])
        writer.writerows(rows)
    return {"slides": n, "train": n - n_test, "test": n_test, "labels": labels,
            "manifest": str(out / "manifest.csv")}
