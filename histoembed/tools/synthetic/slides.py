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
import io
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

SLIDE_LABELS = ("benign", "malignant")
SLIDE_MPP = 0.25
DOWNSAMPLES = (1, 4, 16)
TILE = 256
FIELD = 64  # level-0 pixels per cell of the coarse tissue field


def _pil_jpeg(data: np.ndarray, level: int | None = None, **_: object) -> bytes:
    """JPEG-encode one tile with Pillow (tifffile's encoder without the imagecodecs package)."""
    buf = io.BytesIO()
    tile = np.ascontiguousarray(data).reshape(data.shape[-3:])
    Image.fromarray(tile).save(buf, format="JPEG", quality=int(level or 85))
    return buf.getvalue()


def _jpeg_ready() -> None:
    """tifffile encodes JPEG with imagecodecs; without it, register Pillow's encoder for compression 7."""
    try:
        tifffile.TIFF.COMPRESSORS[7]
    except KeyError:
        tifffile.TIFF.COMPRESSORS._codecs[7] = _pil_jpeg


class SlideSpec:
    """Everything that decides one synthetic slide's pixels (a coarse tissue field and the nuclei look)."""

    def __init__(self, seed: int, width: int, height: int, label: str, blank: bool = False):
        rng = np.random.default_rng(seed)
        self.seed, self.width, self.height, self.label = seed, width, height, label
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

    def tile(self, ds: int, x: int, y: int) -> np.ndarray:
        """The TILE x TILE pixels of the level with downsample ``ds`` whose top-left is level pixel (x, y)."""
        x0, y0 = x * ds, y * ds                       # level-0 px
        span = TILE * ds
        # the coarse field over this tile, resampled to level pixels
        fx0, fy0 = x0 / FIELD, y0 / FIELD
        m = np.float32([[span / FIELD / TILE, 0, fx0], [0, span / FIELD / TILE, fy0]])
        grid_x, grid_y = np.meshgrid(np.arange(TILE, dtype=np.float32), np.arange(TILE, dtype=np.float32))
        mx = m[0, 0] * grid_x + m[0, 2]
        my = m[1, 1] * grid_y + m[1, 2]
        tissue = cv2.remap(self.field, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        inside = (grid_x * ds + x0 < self.width) & (grid_y * ds + y0 < self.height)
        tissue = np.clip((tissue - 0.35) * 4, 0, 1) * inside
        rng = np.random.default_rng([self.seed, ds, x, y])
        img = np.empty((TILE, TILE, 3), np.float32)
        img[:] = 244
        img += rng.normal(0, 2, (TILE, TILE, 1))
        if not tissue.any():
            img[~inside] = 255
            return np.clip(img, 0, 255).astype(np.uint8)
        gx = np.arange(TILE, dtype=np.float32) * ds + x0
        gy = np.arange(TILE, dtype=np.float32) * ds + y0
        texture = np.zeros((TILE, TILE), np.float32)
        for a, k, p in self.waves:  # sin(u + v) = sin u cos v + cos u sin v: outer products, not 65k sines
            u, v = np.cos(a) * k * gx, np.sin(a) * k * gy + p
            texture += np.outer(np.cos(v), np.sin(u)) + np.outer(np.sin(v), np.cos(u))
        stroma = self.stroma * (1 + 0.02 * texture[..., None])
        img = img * (1 - tissue[..., None]) + stroma * tissue[..., None]
        if tissue.any():
            n = rng.poisson(self.density * span * span / 100 * float(tissue.mean()))
            r = max(1, round(self.radius_um / SLIDE_MPP / ds))
            nuclei = np.zeros((TILE, TILE), np.uint8)
            for px, py in rng.integers(0, TILE, (min(n, 20000), 2)):
                if tissue[py, px] > 0.5:
                    cv2.circle(nuclei, (int(px), int(py)), r, 1, -1)
            sel = nuclei.astype(bool)
            img[sel] = self.nucleus
        img[~inside] = 255
        return np.clip(img, 0, 255).astype(np.uint8)

    def level_tiles(self, ds: int):
        w, h = -(-self.width // ds), -(-self.height // ds)
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                yield self.tile(ds, tx, ty)


def write_slide(path: Path, spec: SlideSpec, fmt: str = "svs", mpp: float | None = SLIDE_MPP,
                downsamples: tuple[int, ...] = DOWNSAMPLES) -> Path:
    """Write ``spec`` as a pyramidal tiled slide (``svs``: Aperio-like JPEG; ``tiff``: generic, zlib)."""
    _jpeg_ready()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=spec.width * spec.height > 2**31) as tw:
        for i, ds in enumerate(downsamples):
            w, h = -(-spec.width // ds), -(-spec.height // ds)
            if i and min(w, h) < 64:
                break
            kwargs: dict = dict(shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                                metadata=None, subfiletype=0 if i == 0 else 1)
            if fmt == "svs":
                desc = (f"Aperio Image Library v12.0.0\r\n{spec.width}x{spec.height} [0,0 {spec.width}x{spec.height}] "
                        f"({TILE}x{TILE}) JPEG/RGB Q=85")
                if i == 0 and mpp:
                    desc += f"|AppMag = {40 if mpp <= 0.3 else 20}|MPP = {mpp}"
                kwargs.update(compression="jpeg", compressionargs={"level": 85}, description=desc)
            else:
                kwargs.update(compression="zlib")
                if mpp:
                    per_cm = 1e4 / (mpp * ds)
                    kwargs.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            tw.write(spec.level_tiles(ds), **kwargs)
    return path


def make_slide_cohort(out: Path, n: int = 12, seed: int = 0, size: int = 20000, n_test: int | None = None,
                      fmt: str = "svs") -> dict:
    """``n`` slides (about ``size`` px a side at level 0, 0.25 um/px) with labels and patients, and a manifest.

    About a quarter (at least 2) are test slides; training labels alternate between the classes so
    each has about half; patients hold one or two slides of one class and one split.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    n_test = max(2, n // 4) if n_test is None else n_test
    n_test = min(n_test, max(0, n - 2))
    suffix = ".svs" if fmt == "svs" else ".tiff"
    rows, labels, patient = [], {}, 0
    for i in range(n):
        split = "test" if i >= n - n_test else "train"
        label = SLIDE_LABELS[(i // 2) % 2] if split == "train" else SLIDE_LABELS[int(rng.integers(0, 2))]
        if i % 2 == 0 or split == "test" or (i // 2) % 3 == 2:  # pairs of slides, every third pair two patients
            patient += 1
        w = int(size * rng.uniform(0.85, 1.0))
        h = int(size * rng.uniform(0.7, 0.9))
        name = f"slides/slide_{i:03d}{suffix}"
        write_slide(out / name, SlideSpec(int(rng.integers(2**31)), w, h, label), fmt)
        rows.append([name, "", label if split == "train" else "", split, f"patient_{patient:03d}"])
        labels[name] = label
    with (out / "manifest.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask", "label", "split", "group"])
        writer.writerows(rows)
    return {"slides": n, "train": n - n_test, "test": n_test, "labels": labels,
            "manifest": str(out / "manifest.csv")}
