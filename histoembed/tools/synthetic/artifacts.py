"""Planted slide artifacts for ``synth --slides --artifacts``: a marker stroke of each colour (blue, green, red,
black) from the glass into the tissue, a band out of focus, a fold and an air bubble, drawn into a synthetic
slide at every pyramid level, with where they are written beside the slide (``<slide>.artifacts.json``, level-0
pixels) so that tests can measure each artifact rule against the truth.

The artifacts are placed on the slide's tissue (its coarse field) so they do not overlap: strokes in the top and
bottom quarters, the fold and the bubble in the middle, the blurred band below them. Drawing follows the light:
ink and folds add optical density (a fold doubles the tissue: its density x ``FOLD_OD``); the blurred band is the
slide's own pixels through a Gaussian of ``BLUR_SIGMA_UM``; a bubble is a grey refractive rim around tissue seen
paler through air.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from histoembed.tools.synthetic.slides import FIELD, SLIDE_MPP, TILE, SlideSpec

INK_OD = {"blue": (1.6, 0.9, 0.15), "green": (1.3, 0.25, 1.1), "red": (0.1, 2.0, 1.7), "black": (2.6, 2.6, 2.6)}
FOLD_OD = 2.3            # a fold: the tissue's optical density times this (two layers and a bit)
BLUR_SIGMA_UM = 3.0      # the out-of-focus band: a Gaussian of this many microns
BUBBLE_SIGMA_UM = 2.0    # tissue under an air bubble is out of focus too, a little
GLASS = 244.0            # the synthetic slide's glass grey level (no density)
STROKE_WIDTH = 0.035     # a stroke's width, as a share of the tissue's shorter side
MIN_STROKE_UM = 30.0     # and never thinner than this (a fine-tip marker is about 300 um; these slides are small)
INK_EDGE_UM = 4.0
PLAIN_CACHE = 256        # plain tiles kept for the blurred regions' neighbourhoods        # a stroke's edge fades over this many microns


@dataclass
class Stroke:
    colour: str
    start: tuple[int, int]      # level-0 px, on the glass
    end: tuple[int, int]        # level-0 px, inside the tissue
    width: int                  # level-0 px


@dataclass
class Planted:
    """Where the artifacts of one slide are, in level-0 pixels (what ``<slide>.artifacts.json`` holds)."""

    mpp: float
    strokes: list[Stroke] = field(default_factory=list)
    blur: tuple[int, int, int, int] = (0, 0, 0, 0)       # box x0, y0, x1, y1
    blur_sigma_um: float = BLUR_SIGMA_UM
    fold: tuple[int, int, int, int] = (0, 0, 0, 0)       # box
    fold_od: float = FOLD_OD
    bubble: tuple[int, int, int] = (0, 0, 0)             # centre x, y and radius

    def write(self, slide_path: Path) -> Path:
        path = Path(slide_path).with_name(Path(slide_path).name + ".artifacts.json")
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def read(cls, path: Path) -> Planted:
        d = json.loads(Path(path).read_text())
        d["strokes"] = [Stroke(s["colour"], tuple(s["start"]), tuple(s["end"]), int(s["width"]))
                        for s in d["strokes"]]
        return cls(**{k: tuple(v) if isinstance(v, list) and k != "strokes" else v for k, v in d.items()})


def place(spec: SlideSpec) -> Planted:
    """The artifacts' places on ``spec``'s tissue: its bounding box on the coarse field, cut into bands."""
    ys, xs = np.nonzero(spec.field > 0.5)
    if not len(xs):
        raise ValueError("the slide has no tissue to draw artifacts on")
    x0, x1 = int(xs.min()) * FIELD, min(spec.width, int(xs.max() + 1) * FIELD)
    y0, y1 = int(ys.min()) * FIELD, min(spec.height, int(ys.max() + 1) * FIELD)
    w, h = x1 - x0, y1 - y0
    width = max(round(MIN_STROKE_UM / SLIDE_MPP), round(STROKE_WIDTH * min(w, h)))

    def at(fx: float, fy: float) -> tuple[int, int]:
        return int(x0 + fx * w), int(y0 + fy * h)

    far_x, far_y = spec.width - 1, spec.height - 1
    strokes = [Stroke("blue", (0, 0), at(0.35, 0.22), width), Stroke("green", (far_x, 0), at(0.65, 0.22), width),
               Stroke("red", (0, far_y), at(0.35, 0.9), width),
               Stroke("black", (far_x, far_y), at(0.65, 0.9), width)]
    r = round(0.07 * min(w, h))
    return Planted(SLIDE_MPP, strokes, blur=(x0, *at(0, 0.58)[1:], x1, at(0, 0.82)[1]),
                   fold=(*at(0.15, 0.38), *at(0.55, 0.5)), bubble=(*at(0.78, 0.44), r))


def stroke_cover(s: Stroke, gx: np.ndarray, gy: np.ndarray) -> np.ndarray | None:
    """How much of each pixel (level-0 coordinates ``gx`` (1 x W), ``gy`` (H x 1)) the stroke covers: 1 within
    half its width of the segment, falling to 0 over ``INK_EDGE_UM`` (None when it covers none of them)."""
    (ax, ay), (bx, by) = s.start, s.end
    edge = INK_EDGE_UM / SLIDE_MPP
    reach = s.width / 2 + edge
    if (gx.max() < min(ax, bx) - reach or gx.min() > max(ax, bx) + reach
            or gy.max() < min(ay, by) - reach or gy.min() > max(ay, by) + reach):
        return None
    vx, vy = bx - ax, by - ay
    t = np.clip(((gx - ax) * vx + (gy - ay) * vy) / max(vx * vx + vy * vy, 1), 0, 1)
    d = np.hypot(gx - ax - t * vx, gy - ay - t * vy)
    cover = np.clip((reach - d) / edge, 0, 1)
    return cover if cover.any() else None


class ArtifactSlideSpec(SlideSpec):
    """A synthetic slide with ``place``'s artifacts drawn in, the same at every level."""

    def __init__(self, seed: int, width: int, height: int, label: str, blank: bool = False):
        super().__init__(seed, width, height, label, blank)
        self.args = (seed, width, height, label, blank)
        self.planted = None if blank or not (self.field > 0.5).any() else place(self)
        self._plain: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()

    def __reduce__(self):
        """Pickled as its arguments (a worker process that draws its tiles rebuilds it, artifacts and all)."""
        return ArtifactSlideSpec, self.args

    def write_truth(self, slide_path: Path) -> Path | None:
        """Where the artifacts are, beside the slide (``<slide>.artifacts.json``)."""
        return self.planted.write(slide_path) if self.planted is not None else None

    def tile(self, ds: int, x: int, y: int) -> np.ndarray:
        p = self.planted
        img = super().tile(ds, x, y)
        if p is None:
            return img
        gy = (np.arange(TILE) * ds + y * ds)[:, None]       # the tile's pixels in level-0 coordinates
        gx = (np.arange(TILE) * ds + x * ds)[None, :]
        bx0, by0, bx1, by1 = p.blur
        band = (gx >= bx0) & (gx < bx1) & (gy >= by0) & (gy < by1)
        cx, cy, r = p.bubble
        d = np.sqrt((gx - cx) ** 2.0 + (gy - cy) ** 2.0)
        inside, rim = d < r * 0.85, (d >= r * 0.85) & (d < r)
        if band.any() or inside.any():
            img = np.where(band[..., None], self._blurred(ds, x, y, p.blur_sigma_um), img)
            img = np.where(inside[..., None], self._blurred(ds, x, y, BUBBLE_SIGMA_UM), img)
        img = img.astype(np.float32)
        fx0, fy0, fx1, fy1 = p.fold
        fold = (gx >= fx0) & (gx < fx1) & (gy >= fy0) & (gy < fy1)
        if fold.any():
            od = -np.log(np.clip(img, 1, GLASS) / GLASS)
            img = np.where(fold[..., None], GLASS * np.exp(-p.fold_od * od), img)
        if rim.any() or inside.any():   # seen through air: paler and out of focus, inside a grey refractive rim
            img = np.where(inside[..., None], 0.6 * img + 0.4 * 236.0, img)
            img = np.where(rim[..., None], 0.3 * img + np.float32([70, 70, 76]), img)
        for s in p.strokes:
            cover = stroke_cover(s, gx.astype(np.float32), gy.astype(np.float32))
            if cover is not None:
                img = img * np.exp(-cover[..., None] * np.float32(INK_OD[s.colour]))
        return np.clip(img, 0, 255).astype(np.uint8)

    def _blurred(self, ds: int, x: int, y: int, sigma_um: float) -> np.ndarray:
        """The plain tile through a Gaussian of ``sigma_um``, from a 3 x 3 mosaic of plain tiles (no seams at the
        tile's edges)."""
        def plain(tx: int, ty: int) -> np.ndarray:   # beyond the slide's top or left: white, as beyond its end
            if tx < 0 or ty < 0:
                return np.full((TILE, TILE, 3), 255, np.uint8)
            key = (ds, tx, ty)
            if key not in self._plain:                # tiles are written row by row: keep about three rows
                self._plain[key] = SlideSpec.tile(self, ds, tx, ty)
                while len(self._plain) > PLAIN_CACHE:
                    self._plain.popitem(last=False)
            return self._plain[key]

        sigma = sigma_um / self.planted.mpp / ds
        m = min(TILE, math.ceil(4 * sigma))            # the Gaussian's reach beyond the tile
        mosaic = np.vstack([np.hstack([plain(x + dx * TILE, y + dy * TILE) for dx in (-1, 0, 1)]) for dy in (-1, 0, 1)])
        near = mosaic[TILE - m:2 * TILE + m, TILE - m:2 * TILE + m]
        return cv2.GaussianBlur(near, (0, 0), sigma)[m:m + TILE, m:m + TILE]
