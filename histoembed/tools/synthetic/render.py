"""Drawing H&E-like tissue: stain concentrations rendered the way light passes a stained slide.

Images are rendered from stain concentrations (Beer-Lambert: ``rgb = 255 * exp(-(H * h_od + E * e_od))``),
so the colours are those of haematoxylin (purple nuclei) and eosin (pink stroma) on a white slide. The
four reference labels differ in *morphology* inside the tumour mask, not in colour (stain strength varies
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
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LABELS = ("HER2(+)", "Luminal A", "Luminal B", "Triple negative")

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


def near_copy(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A lightly re-stained, noisy copy of an image: what a near-duplicate across splits looks like."""
    gain = rng.uniform(0.96, 1.04, 3).astype(np.float32)
    out = rgb.astype(np.float32) * gain + rng.normal(0, 3.0, rgb.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)
