"""A synthetic H&E dataset in the reference layout, for the demo, the tests and the benchmarks.

Images are rendered from stain concentrations the way light passes a stained slide
(Beer-Lambert: ``rgb = 255 * exp(-(H * h_od + E * e_od))``), so the colours are those of
haematoxylin (purple nuclei) and eosin (pink stroma) on a white slide. The four reference
labels differ in *morphology* inside the tumour mask, not in colour (stain strength varies
per image and independently of the class):

==================  =========  ==========  ===========  ===========  ==============
label               nuclei     nucleus     glands       clustering   fibres
                    coverage   radius (px) (duct rings) of nuclei    alignment
==================  =========  ==========  ===========  ===========  ==============
Luminal A           low        small       many         weak         aligned
Luminal B           medium     medium      some         medium       mostly aligned
HER2(+)             high       large, var  few          strong       mixed
Triple negative     highest    large, var  almost none  medium       disordered
==================  =========  ==========  ===========  ===========  ==============

Every parameter is drawn per image around its class's value with a wide spread, so the
classes overlap: a good classifier does well above chance but not perfectly.

Layout written by :func:`make_dataset`, the reference challenge's naming::

    out/train_data/img_0000.png, mask_0000.png, ...   ids 0 .. n_train-1
    out/test_data/img_0000.png,  mask_0000.png, ...   ids 0 .. n_test-1 (the same names as training images)
    out/train_labels.csv                              sample_index,label
    out/planted.json                                  what was planted (below)

As in the real data, both splits number from ``img_0000.png``, so only (split, name)
identifies an image. The planted cases (``outliers=True``), all listed in ``planted.json``:

* ``flags``: {training image: non_tissue | ink | blank}: a cartoon (flat saturated colours,
  a green ogre-like face), a tissue image with a green-ink smear, a tissue image whose mask
  is empty;
* ``mask_twins``: [[cartoon, tissue image]]: each cartoon is pasted at the size of a tissue
  image and its mask file is that image's mask file, byte for byte (the real data has 60
  such pairs);
* ``near_duplicates``: [[test image, training image]]: a test image that is a lightly
  re-stained, noisy copy of a training image (possible leakage, never dropped).

:func:`reference_scale` writes the real challenge's size: 691 training images with the
real label counts, 477 test images, image sizes spread like the real PNGs (0.2-3.6 MB,
median about 0.7 MB, at ``size_scale`` 1) and 60 mask twins. Everything depends on ``seed``
alone; training image i uses its own generator seeded by ``(seed, i)``, test image j by
``(seed, n_train + j)``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import cv2
import numpy as np
import pyarrow as pa
import tifffile
from PIL import Image

from histoembed.core import cpus, feature_store, store
from histoembed.engines.local import map_ordered
from histoembed.inputs.pixels import tissue_mask_by_colour

LABELS = ("HER2(+)", "Luminal A", "Luminal B", "Triple negative")
# Class balance of the reference training set (691 images).
REFERENCE_COUNTS = {"HER2(+)": 189, "Luminal A": 205, "Luminal B": 220, "Triple negative": 77}
PLANTED_FILE = "planted.json"

# Ruifrok & Johnston optical-density vectors of haematoxylin and eosin (R, G, B).
H_OD = np.array([0.65, 0.70, 0.29], np.float32)
E_OD = np.array([0.07, 0.99, 0.11], np.float32)


@dataclass(frozen=True)
class Morphology:
    """The tumour's look for one class; each value is a centre that images scatter around."""

    coverage: float      # share of the tumour area covered by nuclei
    radius: float        # mean nucleus radius, px
    pleomorphism: float  # relative spread of nucleus size
    glands: float        # gland rings per 10,000 px of tumour
    clustering: float    # share of nuclei placed in tight clusters
    alignment: float     # 1: all stroma fibres one way, 0: no preferred direction


MORPHOLOGY = {
    "Luminal A": Morphology(coverage=0.16, radius=2.6, pleomorphism=0.10, glands=1.3, clustering=0.15, alignment=0.85),
    "Luminal B": Morphology(coverage=0.24, radius=3.1, pleomorphism=0.20, glands=0.7, clustering=0.35, alignment=0.65),
    "HER2(+)": Morphology(coverage=0.32, radius=3.9, pleomorphism=0.35, glands=0.3, clustering=0.65, alignment=0.45),
    "Triple negative": Morphology(coverage=0.40, radius=3.7, pleomorphism=0.30, glands=0.05, clustering=0.40,
                                  alignment=0.20),
}
SPREAD = 0.35  # log-normal spread of every morphology value per image: what makes classes overlap


# ---------------------------------------------------------------- small building blocks

def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: ``cells`` random values across, upsampled smoothly."""
    ch = max(2, round(cells * h / max(h, w)))
    cw = max(2, round(cells * w / max(h, w)))
    coarse = rng.random((ch, cw), dtype=np.float32)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


def _fibres(rng: np.random.Generator, h: int, w: int, alignment: float) -> np.ndarray:
    """Stroma texture in [0, 1]: noise smeared along one angle (aligned) or many (disordered)."""
    noise = rng.random((h, w), dtype=np.float32)
    length = 17
    base = rng.uniform(0, np.pi)
    out = np.zeros((h, w), np.float32)
    n_dirs = 1 + int(round((1 - alignment) * 4))  # 1 (aligned) .. 5 directions
    for d in range(n_dirs):
        angle = base + (d * np.pi / n_dirs if n_dirs > 1 else 0.0)
        kernel = np.zeros((length, length), np.float32)
        c = length // 2
        dx, dy = np.cos(angle) * c, np.sin(angle) * c
        cv2.line(kernel, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1)
        kernel /= kernel.sum()
        out += cv2.filter2D(noise, -1, kernel, borderType=cv2.BORDER_REFLECT)
    out /= n_dirs
    lo, hi = np.percentile(out, (2, 98))
    return np.clip((out - lo) / max(hi - lo, 1e-6), 0, 1)


def _jitter(rng: np.random.Generator, value: float, spread: float = SPREAD) -> float:
    return float(value * np.exp(rng.normal(0, spread)))


def _tissue_region(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Where the section lies on the slide: one irregular piece covering about half to 85%."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.sqrt(((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)
    field = _smooth_field(rng, h, w, 5) - 0.55 * r
    return field > np.quantile(field, 1 - rng.uniform(0.5, 0.85))


def tumour_mask(rng: np.random.Generator, tissue: np.ndarray, n_blobs: int | None = None) -> np.ndarray:
    """Several irregular tumour blobs of varying size on the tissue (uint8 0/255)."""
    h, w = tissue.shape
    n_blobs = int(rng.integers(2, 7)) if n_blobs is None else n_blobs
    ys, xs = np.nonzero(tissue)
    canvas = np.zeros((h, w), np.uint8)
    side = min(h, w)
    for _ in range(n_blobs):
        i = int(rng.integers(len(ys)))
        r = side * rng.uniform(0.06, 0.24)
        axes = (max(4, round(r)), max(4, round(r * rng.uniform(0.5, 1.0))))
        cv2.ellipse(canvas, (int(xs[i]), int(ys[i])), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    # Ragged borders: blur, add low-frequency noise, threshold again.
    soft = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), side / 60)
    soft += 0.35 * (_smooth_field(rng, h, w, 12) - 0.5)
    return ((soft > 0.5) & tissue).astype(np.uint8) * 255


def _draw_nuclei(rng: np.random.Generator, nuclei: np.ndarray, where: np.ndarray, n: int, radius: float,
                 pleomorphism: float, clustering: float) -> None:
    """Draw ``n`` elliptical nuclei (intensity 150-255) at places where ``where`` is true."""
    ys, xs = np.nonzero(where)
    if n <= 0 or len(ys) == 0:
        return
    pick = rng.integers(len(ys), size=n)
    cx, cy = xs[pick].astype(np.float32), ys[pick].astype(np.float32)
    # Clustered nuclei sit tightly around a few seeds.
    n_clustered = int(n * min(clustering, 1.0))
    if n_clustered:
        n_seeds = max(1, n_clustered // 25)
        seeds = rng.integers(len(ys), size=n_seeds)
        owner = rng.integers(n_seeds, size=n_clustered)
        spread = radius * 4
        cx[:n_clustered] = xs[seeds][owner] + rng.normal(0, spread, n_clustered)
        cy[:n_clustered] = ys[seeds][owner] + rng.normal(0, spread, n_clustered)
    r = np.clip(radius * np.exp(rng.normal(0, pleomorphism, n)), 1.2, radius * 4)
    elong = rng.uniform(0.6, 1.0, n)
    angle = rng.uniform(0, 180, n)
    shade = rng.integers(150, 256, n)
    for x, y, a, b, t, s in zip(cx, cy, r, r * elong, angle, shade):
        cv2.ellipse(nuclei, (int(x), int(y)), (max(1, round(a)), max(1, round(b))), float(t), 0, 360,
                    int(s), -1)


def _draw_glands(rng: np.random.Generator, lumen: np.ndarray, epithelium: np.ndarray, nuclei: np.ndarray,
                 where: np.ndarray, n: int, radius: float) -> None:
    """Duct rings: a clear lumen, a rim of epithelium and a ring of nuclei around it."""
    ys, xs = np.nonzero(where)
    if n <= 0 or len(ys) == 0:
        return
    for i in rng.integers(len(ys), size=n):
        cx, cy = int(xs[i]), int(ys[i])
        rl = float(rng.uniform(3, 7) * radius)
        axes = (round(rl), round(rl * rng.uniform(0.6, 1.0)))
        angle = float(rng.uniform(0, 180))
        rim = round(radius * 2.5)
        cv2.ellipse(epithelium, (cx, cy), (axes[0] + rim, axes[1] + rim), angle, 0, 360, 255, -1)
        cv2.ellipse(lumen, (cx, cy), axes, angle, 0, 360, 255, -1)
        k = max(6, int(2 * np.pi * rl / (2.4 * radius)))
        for phi in np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 1):
            ca, sa = np.cos(np.radians(angle)), np.sin(np.radians(angle))
            px, py = (axes[0] + rim / 2) * np.cos(phi), (axes[1] + rim / 2) * np.sin(phi)
            x, y = cx + px * ca - py * sa, cy + px * sa + py * ca
            cv2.ellipse(nuclei, (int(x), int(y)), (max(1, round(radius)), max(1, round(radius * 0.7))),
                        float(np.degrees(phi) + angle + 90), 0, 360, int(rng.integers(170, 256)), -1)


# ---------------------------------------------------------------- planted stain shifts

# What each stain group's stains look like at strength 1 (``--stain-shift 1``), as the change of the
# haematoxylin and eosin optical-density vectors: a gain on the vector (darker or paler stain) and an
# added OD direction that turns its hue. Strength s applies gain ** s and s x the direction.
# train-a: the standard stains (half of each class's training images);
# train-b: darker (1.8x), bluer haematoxylin, eosin as is (the other half: another lab's batch);
# test:    paler haematoxylin and darker, more orange eosin (every test image: a third lab).
STAIN_GROUPS = {
    "train-a": {"h_gain": 1.0, "e_gain": 1.0, "h_turn": (0.0, 0.0, 0.0), "e_turn": (0.0, 0.0, 0.0)},
    "train-b": {"h_gain": 1.8, "e_gain": 1.0, "h_turn": (0.2, 0.05, -0.1), "e_turn": (0.0, 0.0, 0.0)},
    "test": {"h_gain": 0.7, "e_gain": 1.5, "h_turn": (0.0, 0.0, 0.0), "e_turn": (0.0, 0.0, 0.15)},
}


def shifted_stains(group: str, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """The haematoxylin and eosin OD vectors of ``group`` (a key of ``STAIN_GROUPS``) at ``strength`` (0: standard)."""
    g = STAIN_GROUPS[group]
    h = (H_OD + strength * np.asarray(g["h_turn"], np.float32)) * g["h_gain"] ** strength
    e = (E_OD + strength * np.asarray(g["e_turn"], np.float32)) * g["e_gain"] ** strength
    return np.clip(h, 0.01, None).astype(np.float32), np.clip(e, 0.01, None).astype(np.float32)


def stain_groups(labels: list[str], seed: int) -> list[str]:
    """Half of each class's training images (every other one, in a seeded order) go to ``train-b``.

    Balanced within each class, so the stain says nothing about the label; drawn from a
    generator of its own, so planting a shift leaves every image's morphology unchanged.
    """
    rng = np.random.default_rng([seed, 0x57A1])
    groups = ["train-a"] * len(labels)
    for label in sorted(set(labels)):
        members = [i for i, lab in enumerate(labels) if lab == label]
        for k, i in enumerate(rng.permutation(members)):
            groups[int(i)] = "train-b" if k % 2 else "train-a"
    return groups


def render(h_conc: np.ndarray, e_conc: np.ndarray, rng: np.random.Generator,
           stains: tuple[np.ndarray, np.ndarray] = (H_OD, E_OD)) -> np.ndarray:
    """Stain concentrations to RGB through Beer-Lambert with the ``stains`` OD vectors, varied per image."""
    h_od = stains[0] * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    e_od = stains[1] * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    od = h_conc[..., None] * h_od + e_conc[..., None] * e_od
    rgb = 250.0 * np.exp(-od)
    rgb += rng.normal(0, 2.5, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- images

def tissue_image(rng: np.random.Generator, width: int, height: int, label: str, empty_mask: bool = False,
                 stains: tuple[np.ndarray, np.ndarray] = (H_OD, E_OD)) -> tuple[np.ndarray, np.ndarray]:
    """One H&E-like image (HxWx3 uint8) of class ``label`` and its tumour mask (HxW uint8 0/255).

    ``stains`` (haematoxylin and eosin OD vectors, e.g. from ``shifted_stains``) change the
    colours only: the same generator state gives the same tissue under any stains.
    """
    m = MORPHOLOGY[label]
    h, w = height, width
    tissue = _tissue_region(rng, h, w)
    mask = tumour_mask(rng, tissue)
    inside = mask > 0

    alignment = float(np.clip(m.alignment + rng.normal(0, 0.2), 0, 1))
    fibres = _fibres(rng, h, w, alignment)
    density = _smooth_field(rng, h, w, 8)
    eosin = np.where(tissue, (0.35 + 0.45 * fibres) * (0.7 + 0.5 * density) * rng.uniform(0.75, 1.25), 0)
    haem = np.where(tissue, 0.06, 0.0).astype(np.float32)
    # Tumour cells: denser, more basophilic cytoplasm than the stroma around them.
    eosin = np.where(inside, 0.8 * eosin, eosin)
    haem = np.where(inside, haem + 0.08, haem)

    nuclei = np.zeros((h, w), np.uint8)
    lumen = np.zeros((h, w), np.uint8)
    epithelium = np.zeros((h, w), np.uint8)
    # Normal stroma: sparse small nuclei, the same for every class.
    stroma = tissue & ~inside
    n_stroma = int(0.03 * stroma.sum() / (np.pi * 2.5 ** 2))
    _draw_nuclei(rng, nuclei, stroma, n_stroma, 2.5, 0.15, 0.1)
    # Tumour: the class's morphology, each value scattered per image.
    area = int(inside.sum())
    radius = _jitter(rng, m.radius, SPREAD * 0.6)  # in pixels, whatever the image size
    n_glands = int(rng.poisson(_jitter(rng, m.glands) * area / 10_000))
    _draw_glands(rng, lumen, epithelium, nuclei, inside, n_glands, radius)
    coverage = min(_jitter(rng, m.coverage), 0.8)
    n_tumour = int(coverage * area / (np.pi * radius ** 2))
    _draw_nuclei(rng, nuclei, inside & (lumen == 0), n_tumour, radius, _jitter(rng, m.pleomorphism),
                 float(np.clip(m.clustering + rng.normal(0, 0.15), 0, 1)))

    chromatin = 0.75 + 0.5 * rng.random((h, w), dtype=np.float32)
    nuc = nuclei.astype(np.float32) / 255 * chromatin
    epi = epithelium > 0
    eosin = np.where(epi, 0.55 * eosin + 0.25, eosin)
    haem = np.where(epi, haem + 0.12, haem)
    clear = lumen > 0
    eosin = np.where(clear, 0.04, eosin)
    haem = np.where(clear, 0.01, haem) + 1.3 * nuc * rng.uniform(0.8, 1.2)
    haem = np.where(tissue | (nuclei > 0), haem, 0)
    haem = cv2.GaussianBlur(haem.astype(np.float32), (0, 0), 0.7)
    eosin = cv2.GaussianBlur(eosin.astype(np.float32), (0, 0), 0.7)
    rgb = render(haem, eosin, rng, stains)
    if empty_mask:
        mask = np.zeros_like(mask)
    return rgb, mask


def add_ink(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A green marker-pen smear across the image (a thick curved stroke, partly translucent)."""
    h, w = rgb.shape[:2]
    t = np.linspace(0, 1, 40)[:, None]
    p = rng.uniform((0.05 * w, 0.1 * h), (0.95 * w, 0.9 * h), size=(4, 2))
    curve = ((1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t ** 2 * p[2]
             + t ** 3 * p[3]).astype(np.int32)
    stroke = np.zeros((h, w), np.uint8)
    cv2.polylines(stroke, [curve], False, 255, max(6, round(min(h, w) * rng.uniform(0.04, 0.08))), cv2.LINE_AA)
    alpha = cv2.GaussianBlur(stroke.astype(np.float32) / 255, (0, 0), 2) * 0.85
    green = np.array([40, 150, 70], np.float32) * rng.uniform(0.9, 1.1)
    out = rgb.astype(np.float32) * (1 - alpha[..., None]) + green * alpha[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def cartoon_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A pasted non-tissue picture: a flat-coloured green ogre-like face on a saturated background."""
    h, w = height, width
    bg = [(90, 170, 240), (250, 210, 60), (240, 120, 40)][int(rng.integers(3))]
    img = np.full((h, w, 3), bg, np.uint8)
    cx, cy = w // 2 + int(rng.integers(-w // 10, w // 10 + 1)), h // 2 + int(rng.integers(-h // 10, h // 10 + 1))
    rx, ry = int(w * rng.uniform(0.28, 0.36)), int(h * rng.uniform(0.32, 0.4))
    skin, dark = (110, 180, 50), (20, 20, 20)
    cv2.rectangle(img, (0, h - h // 6), (w, h), (160, 40, 40), -1)             # shirt
    for side in (-1, 1):                                                         # trumpet ears
        ex = cx + side * rx
        cv2.ellipse(img, (ex, cy - ry // 4), (rx // 5, ry // 6), 0, 0, 360, skin, -1)
        cv2.circle(img, (ex + side * rx // 8, cy - ry // 4), max(2, rx // 14), (70, 120, 30), -1)
    cv2.ellipse(img, (cx, cy), (rx, ry), 0, 0, 360, skin, -1)                  # face
    for side in (-1, 1):
        ex, ey = cx + side * rx // 2 - rx // 8 * side, cy - ry // 4
        cv2.ellipse(img, (ex, ey), (rx // 5, ry // 7), 0, 0, 360, (255, 255, 255), -1)  # eyes
        cv2.circle(img, (ex, ey), max(2, rx // 12), dark, -1)
        cv2.line(img, (ex - rx // 5, ey - ry // 5), (ex + rx // 6, ey - ry // 4), (60, 90, 20), max(2, rx // 20))
    cv2.ellipse(img, (cx, cy + ry // 10), (rx // 7, ry // 8), 0, 0, 360, (90, 150, 40), -1)   # nose
    cv2.ellipse(img, (cx, cy + ry // 2), (rx // 2, ry // 6), 0, 0, 180, (120, 30, 30), -1)     # mouth
    return img


# ---------------------------------------------------------------- the dataset

def class_counts(n: int) -> dict[str, int]:
    """``n`` labels split like the reference (HER2 189, LumA 205, LumB 220, TN 77), each >= 1 when n >= 4."""
    total = sum(REFERENCE_COUNTS.values())
    raw = {k: n * v / total for k, v in REFERENCE_COUNTS.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    if n >= len(LABELS):
        for k in LABELS:
            if counts[k] == 0:
                counts[max(counts, key=counts.get)] -= 1
                counts[k] = 1
    return counts


def _write_png(path: Path, array: np.ndarray) -> None:
    bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"could not write {path}")


# Pixel counts that give PNGs spread like the reference challenge's (0.2-3.6 MB, median ~0.7 MB) at the
# ~1.75 bytes per pixel these images compress to: log-normal around 0.4 MPx, clipped.
REFERENCE_PIXELS = (115_000, 400_000, 2_100_000)   # smallest, median, largest pixel count
REFERENCE_SPREAD = 0.6                              # sigma of log(pixel count)
REFERENCE_TRAIN, REFERENCE_TEST, REFERENCE_MASK_TWINS = 691, 477, 60


def reference_sizes(rng: np.random.Generator, scale: float = 1.0) -> tuple[int, int]:
    """(width, height) of one image with the reference data's spread of sizes, sides times ``scale``."""
    lo, median, hi = REFERENCE_PIXELS
    pixels = float(np.clip(median * np.exp(rng.normal(0, REFERENCE_SPREAD)), lo, hi))
    aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(4 / 3))))
    w, h = np.sqrt(pixels * aspect), np.sqrt(pixels / aspect)
    return max(16, round(w * scale)), max(16, round(h * scale))


def near_copy(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A lightly re-stained, noisy copy of an image: what a near-duplicate across splits looks like."""
    gain = rng.uniform(0.96, 1.04, 3).astype(np.float32)
    out = rgb.astype(np.float32) * gain + rng.normal(0, 3.0, rgb.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def min_train(mask_twins: int = 1, near_duplicates: int = 1) -> int:
    """Training images needed to plant the outliers and keep a few clean ones."""
    return 2 * max(1, mask_twins) + 2 + near_duplicates + 3


@dataclass(frozen=True)
class _TissueJob:
    """One tissue image and its mask to draw and write: plain values, so a worker process can take it."""

    image: Path
    mask: Path
    rng_key: tuple[int, int]            # (seed, image number): the image's own generator
    label: str
    stains: tuple[np.ndarray, np.ndarray]
    size_scale: float | None            # reference-like sizes times this, or sides from size_range
    size_range: tuple[int, int]
    class_signal: str
    partial_masks: bool
    empty_mask: bool = False
    ink: bool = False


def _draw_tissue(job: _TissueJob) -> None:
    rng = np.random.default_rng(list(job.rng_key))
    if job.size_scale is not None:
        w, h = reference_sizes(rng, job.size_scale)
    else:
        w, h = (int(v) for v in rng.integers(job.size_range[0], job.size_range[1] + 1, size=2))
    rgb, mask = signal_image(rng, w, h, job.label, job.class_signal, job.partial_masks, empty_mask=job.empty_mask,
                             stains=job.stains)
    if job.ink:
        rgb = add_ink(rgb, rng)
    _write_png(job.image, rgb)
    _write_png(job.mask, mask)


def make_dataset(out: Path, n_train: int = 40, n_test: int = 16, seed: int = 0,
                 size_range: tuple[int, int] = (256, 512), outliers: bool = True, mask_twins: int = 1,
                 near_duplicates: int = 1, reference_size_scale: float | None = None,
                 stain_shift: float = 0.0, class_signal: str = "morphology", partial_masks: bool = False) -> dict:
    """Write a synthetic dataset in the reference layout under ``out``; returns a summary.

    Image sides are drawn from ``size_range``, or, with ``reference_size_scale``, spread like
    the reference challenge's images (times that scale). With ``outliers``: the planted
    ink smear and empty mask, ``mask_twins`` cartoons pasted over other training images'
    masks (at least one cartoon is always planted) and ``near_duplicates`` test images that
    copy a training image. The summary holds ``train``/``test`` (lists of names),
    ``labels`` ({name: label} of the training split, also in ``train_labels.csv``),
    ``counts`` (per label), ``planted`` ({training name: kind}), ``mask_twins`` and
    ``near_duplicates`` (pairs, as in ``planted.json``).

    ``stain_shift`` (strength, 0: none) plants a stain shift (``STAIN_GROUPS``): half of each
    class's training images are rendered with group ``train-b``'s stains, the rest with the
    standard ones (``train-a``), and every test image with group ``test``'s; the same images are
    drawn as without the shift, only their colours change. Near-duplicate test images copy
    their training image's pixels, stains included. The summary's and ``planted.json``'s
    ``stain_shift`` holds the strength and each image's group (``{"train": {name: group},
    "test": {name: group}}``).

    ``class_signal`` (``morphology``, ``tumour``, ``context``) says where the class shows (see
    CLASS_SIGNALS); ``partial_masks`` writes masks that miss the tumour (:func:`partial_mask`), for
    both splits. Both are recorded in ``planted.json`` and the summary.
    """
    out = Path(out)
    if n_train < 1 or n_test < 0:
        raise ValueError("need n_train >= 1 and n_test >= 0")
    if stain_shift < 0:
        raise ValueError("stain_shift must be >= 0")
    n_cartoons = max(1, mask_twins) if outliers else 0
    n_near = min(near_duplicates, n_test) if outliers else 0
    if outliers and n_train < min_train(n_cartoons, n_near):
        raise ValueError(f"planting outliers needs n_train >= {min_train(n_cartoons, n_near)}")
    rng = np.random.default_rng(seed)
    counts = class_counts(n_train)
    train_labels = [k for k in LABELS for _ in range(counts[k])]
    rng.shuffle(train_labels)
    # Test labels are drawn with the same balance; they are not written (as in the challenge).
    test_labels = list(rng.choice(LABELS, size=n_test, p=[REFERENCE_COUNTS[k] / 691 for k in LABELS]))
    planted: dict[str, str] = {}
    twins: list[tuple[int, int]] = []       # (cartoon, tissue image whose mask it reuses), training indices
    near: list[tuple[int, int]] = []        # (test index, training index it copies)
    if outliers:
        order = [int(i) for i in rng.permutation(n_train)]
        cartoons, sources = order[:n_cartoons], order[n_cartoons:2 * n_cartoons]
        ink, blank = order[2 * n_cartoons], order[2 * n_cartoons + 1]
        copied = order[2 * n_cartoons + 2:2 * n_cartoons + 2 + n_near]
        twins = list(zip(cartoons, sources))
        for c in cartoons:
            planted[f"img_{c:04d}.png"] = "non_tissue"
        planted[f"img_{ink:04d}.png"] = "ink"
        planted[f"img_{blank:04d}.png"] = "blank"
        near = list(zip(sorted(int(j) for j in rng.choice(n_test, size=n_near, replace=False)), copied))

    for split in ("train", "test"):
        (out / f"{split}_data").mkdir(parents=True, exist_ok=True)
    train_dir, test_dir = out / "train_data", out / "test_data"
    groups = stain_groups(train_labels, seed) if stain_shift else ["train-a"] * n_train
    stains = {g: shifted_stains(g, stain_shift) for g in STAIN_GROUPS}
    cartoon_of = {c: src for c, src in twins}
    copy_of = dict(near)
    sizes = (reference_size_scale, size_range)
    # Tissue images first, in worker processes (each image draws from its own generator, so the files
    # do not depend on the order or the number of processes); then cartoons, which take their
    # source's size and mask file, and test copies of training images.
    jobs = [_TissueJob(train_dir / f"img_{i:04d}.png", train_dir / f"mask_{i:04d}.png", (seed, i), train_labels[i],
                       stains[groups[i]], *sizes, class_signal, partial_masks,
                       empty_mask=planted.get(f"img_{i:04d}.png") == "blank",
                       ink=planted.get(f"img_{i:04d}.png") == "ink")
            for i in range(n_train) if i not in cartoon_of]
    jobs += [_TissueJob(test_dir / f"img_{j:04d}.png", test_dir / f"mask_{j:04d}.png", (seed, n_train + j),
                        str(test_labels[j]), stains["test"], *sizes, class_signal, partial_masks)
             for j in range(n_test) if j not in copy_of]
    with map_ordered(_draw_tissue, jobs, cpus.usable_cpus() if len(jobs) >= 64 else 1) as drawn:
        for _ in drawn:
            pass
    for i, src in sorted(cartoon_of.items()):
        h, w = cv2.imread(str(train_dir / f"img_{src:04d}.png"), cv2.IMREAD_UNCHANGED).shape[:2]
        _write_png(train_dir / f"img_{i:04d}.png", cartoon_image(np.random.default_rng([seed, i]), w, h))
        shutil.copyfile(train_dir / f"mask_{src:04d}.png", train_dir / f"mask_{i:04d}.png")
    for j, src in sorted(copy_of.items()):
        source = cv2.cvtColor(cv2.imread(str(train_dir / f"img_{src:04d}.png"), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        _write_png(test_dir / f"img_{j:04d}.png", near_copy(source, np.random.default_rng([seed, n_train + j])))
        shutil.copyfile(train_dir / f"mask_{src:04d}.png", test_dir / f"mask_{j:04d}.png")
    labels = {f"img_{i:04d}.png": train_labels[i] for i in range(n_train)}

    labels = dict(sorted(labels.items()))
    lines = ["sample_index,label"] + [f"{k},{v}" for k, v in labels.items()]
    (out / "train_labels.csv").write_text("\n".join(lines) + "\n")
    planted = dict(sorted(planted.items()))
    mask_pairs = [[f"img_{c:04d}.png", f"img_{src:04d}.png"] for c, src in sorted(twins)]
    near_pairs = [[f"img_{j:04d}.png", f"img_{src:04d}.png"] for j, src in sorted(near)]
    shift = None
    if stain_shift:
        copies = {j: f"img_{src:04d}.png" for j, src in near}
        shift = {"strength": stain_shift,
                 "train": {f"img_{i:04d}.png": ("cartoon" if i in cartoon_of else groups[i]) for i in range(n_train)},
                 "test": {f"img_{j:04d}.png": (f"copy of train {copies[j]}" if j in copies else "test")
                          for j in range(n_test)}}
    crop_problems = {"class_signal": class_signal, "partial_masks": partial_masks}
    planted_crops = crop_problems if class_signal != "morphology" or partial_masks else {}  # listed when planted
    (out / PLANTED_FILE).write_text(json.dumps(
        {"flags": planted, "mask_twins": mask_pairs, "near_duplicates": near_pairs,
         **({"stain_shift": shift} if shift else {}), **planted_crops}, indent=2) + "\n")
    return {"train": list(labels), "test": [f"img_{j:04d}.png" for j in range(n_test)], "labels": labels,
            "counts": counts, "planted": planted, "mask_twins": mask_pairs, "near_duplicates": near_pairs,
            "seed": seed, "stain_shift": shift, **crop_problems}


def reference_scale(out: Path, seed: int = 0, size_scale: float = 1.0, near_duplicates: int = 10) -> dict:
    """The reference challenge's layout at full size: 691 training images (HER2(+) 189, Luminal A 205,
    Luminal B 220, Triple negative 77), 477 test images, sizes spread like the real ones (times
    ``size_scale``), 60 cartoons pasted over other images' masks, an ink smear, an empty mask and
    ``near_duplicates`` test images copying training images."""
    return make_dataset(out, REFERENCE_TRAIN, REFERENCE_TEST, seed, outliers=True,
                        mask_twins=REFERENCE_MASK_TWINS, near_duplicates=near_duplicates,
                        reference_size_scale=size_scale)


# ---------------------------------------------------------------- planted crop problems: context, partial masks

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


# ---------------------------------------------------------------- synthetic features (tests, benchmarks)

def write_synthetic_features(run: Path, n_images: int = 60, n_classes: int = 3, crops: int = 2, views: int = 2,
                             dim: int = 16, signal: float = 1.0, seed: int = 0, encoder: str = "synthetic",
                             n_test: int = 0, visible: list[int] | None = None,
                             feature_seed: int | None = None) -> Path:
    """A feature store and crops.parquet with a known signal, written as the embed stage would.

    Like real encoder features, most variance lies in a few directions: a random subspace of
    ``min(dim, 32)`` dimensions holds the class means (spread set by ``signal``), the image's
    own variation and each crop's; a little isotropic noise fills every dimension, and
    views 1.. add augmentation noise (view 0 is the clean crop). Test images (``n_test``)
    get a random class and no label; they are named from img_0000.png like the training images,
    as in the real challenge. Returns the store folder ``run/features/<slug>``.

    Several encoders of one run (``fit --encoder A,B``): call once per ``encoder`` with the same
    ``seed`` (the same crops) and its own ``feature_seed``; ``visible[c]`` is the class mean that
    images of class c get in this encoder's features, so ``visible=[0, 0, 1, 1]`` shows only
    {0, 1} against {2, 3}.
    """
    rng = np.random.default_rng(seed if feature_seed is None else feature_seed)
    shown = list(range(n_classes)) if visible is None else [int(v) for v in visible]
    names = list(LABELS[:n_classes]) if n_classes <= len(LABELS) else \
        [f"class-{k}" for k in range(n_classes)]
    rank = min(dim, 32)
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0]          # orthonormal columns
    means = rng.normal(size=(n_classes, rank)) * signal * 3 / np.sqrt(rank)
    ids = [f"img_{i:04d}.png" for i in [*range(n_images), *range(n_test)]]   # test names repeat training ones
    splits = ["train" if i < n_images else "test" for i in range(len(ids))]
    truth = [i % n_classes if i < n_images else int(rng.integers(n_classes)) for i in range(len(ids))]
    labels = [names[t] if s == "train" else None for t, s in zip(truth, splits)]
    rows = {"image_id": [], "split": [], "crop_index": [], "view": []}
    emb = []
    for i, image_id in enumerate(ids):
        centre = means[shown[truth[i]]] + rng.normal(size=rank)
        for c in range(crops):
            crop = basis @ (centre + rng.normal(size=rank)) + rng.normal(size=dim) * 0.5
            for v in range(views):
                emb.append(crop + rng.normal(size=dim) * (0.0 if v == 0 else 0.3))
                rows["image_id"].append(image_id)
                rows["split"].append(splits[i])
                rows["crop_index"].append(c)
                rows["view"].append(v)
    run = Path(run)
    n_crops = len(ids) * crops
    crops_table = pa.table({
        "image_id": pa.array([i for i in ids for _ in range(crops)], pa.string()),
        "split": pa.array([s for s in splits for _ in range(crops)], pa.string()),
        "label": pa.array([lab for lab in labels for _ in range(crops)], pa.string()),
        "crop_index": pa.array([c for _ in ids for c in range(crops)], pa.int32()),
        **{name: pa.array(np.zeros(n_crops, np.int32)) for name in ("x0", "y0", "x1", "y1")},
        "tissue_fraction": pa.array(np.ones(n_crops, np.float32)),
        "strategy": pa.array(["synthetic"] * n_crops, pa.string()),
        "scale": pa.array(np.ones(n_crops, np.float32)),
        "png": pa.array([b""] * n_crops, pa.binary()),
    }, schema=store.CROPS_SCHEMA)
    crops_key = store.config_key("crops", seed, n_images, n_test, crops)
    store.write_table(crops_table, run / store.CROPS_FILE, meta={"key": crops_key})
    embedding = np.asarray(emb, dtype=np.float32)
    table = pa.table({
        "image_id": pa.array(rows["image_id"], pa.string()), "split": pa.array(rows["split"], pa.string()),
        "crop_index": pa.array(rows["crop_index"], pa.int32()), "view": pa.array(rows["view"], pa.int16()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embedding.ravel()), dim),
    }, schema=feature_store.feature_schema(dim))
    store_dir = run / store.FEATURES_DIR / feature_store.encoder_slug(encoder)
    key = store.config_key("synthetic", n_images, n_classes, crops, views, dim, signal, seed, n_test,
                           *([] if visible is None and feature_seed is None else [shown, feature_seed]))
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(store_dir)
    store.write_table(table, store_dir / "part-00000.parquet",
                      meta={"key": key, "encoder": encoder, "dim": dim, "pool": "synthetic", "seed": seed,
                            "crops_key": crops_key, "repeats": views, "tta": True})
    return store_dir

def write_blank_png(path: Path, width: int, height: int, complete: bool = True) -> None:
    """A black 8-bit gray PNG of any size, streamed row by row (a 30000 x 30000 one is about 0.9 MB).

    This is what a decompression bomb looks like: a small file whose header promises far more
    pixels than memory holds. ``complete=False`` writes the header alone (enough for checks
    that never decode).
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        if complete:
            deflate, row = zlib.compressobj(9), bytes(width + 1)  # filter byte 0, then the row's pixels
            data = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
            f.write(chunk(b"IDAT", data))
        f.write(chunk(b"IEND", b""))


# ---------------------------------------------------------------- whole slides
#
# A synthetic cohort of whole-slide images (pyramidal, tiled, JPEG), for the demo, the tests and the benchmarks.
#
# Each slide is an Aperio-like SVS written with ``tifffile`` (or, with ``fmt="tiff"``, a generic
# tiled pyramidal TIFF with zlib tiles and its resolution in the TIFF tags): 256 x 256 JPEG tiles,
# three levels (downsamples 1, 4, 16; level 0 carries the description ``Aperio Image Library
# ...|MPP = 0.25`` as a scanner writes it, subfiletype 0, smaller levels subfiletype 1). OpenSlide
# reads them as vendor ``aperio`` (``generic-tiff``) with ``openslide.mpp-x`` 0.25.
#
# Pixels are drawn tile by tile from a coarse tissue field (a few blobs of pink stroma on white
# glass), so memory stays at one tile whatever the slide's size. The class shows in the nuclei:
# ``benign`` slides have sparse small nuclei, ``malignant`` dense large darker ones (each slide's
# values jittered). Patients (``group``) hold one or two slides of one class.
#
# Layout written by :func:`make_slide_cohort`::
#
#     out/slides/slide_000.svs ...     (or .tiff)
#     out/manifest.csv                 image,mask,label,split,group


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
