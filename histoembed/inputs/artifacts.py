"""Slide artifacts found without model weights: pen ink and dark scanner borders on the thumbnail, and per patch
blur, ink, folds and background (numpy and OpenCV only; nothing read or written here).

Saturation-Otsu, which ``crops`` uses for tissue, counts saturated marker ink as tissue and embeds an
out-of-focus band like sharp tissue. The rules below are colour and texture rules with stated thresholds, so a
user can read why a patch was left out; every threshold is a named constant of this module.

**Pen ink by colour** (OpenCV HSV: hue 0-180 is degrees / 2, saturation and value 0-255). H&E is two dyes:
haematoxylin absorbs red and green most and leaves nuclei blue-purple (hue about 125-150, i.e. 250-300 degrees),
eosin absorbs green and leaves stroma, muscle and red cells pink to red (hue about 150-180 and 0-8); together they
span only the purple-pink-red arc. Markers are chosen to be seen against it:

- *green* (hue 35-85, the ``qc`` ink rule's ``green_hue``, saturation >= its ``ink_saturation`` 60): no H&E dye is
  green at all, so a plain saturation floor suffices; ``qc``'s rule for images is the same range, with an Otsu
  split above the floor (a slide's thumbnail has too little ink for Otsu to be stable, so the floor alone here).
- *blue* (hue 85-122, saturation >= 90): between green and haematoxylin. The 122 edge keeps clear of the bluest
  haematoxylin (about 125 on a thumbnail, where each pixel averages nuclei with stroma); blue ink over pink
  tissue stays below 120 because the ink takes away the red that would turn it purple.
- *red* (hue 172-180 or 0-6, saturation >= 190, i.e. 75 %): the riskiest, as eosin and red cells share the hue.
  Eosin-stained tissue stays under about 60 % saturation on a thumbnail; haemorrhage can come near 70 %; red
  marker ink is 80-90 %. A pale red marker is missed rather than haemorrhage called ink.
- *black* (value < 50, any hue): H&E is translucent, so even dense nuclei averaged over a thumbnail pixel stay
  above a value of about 80; black ink, and doubled folds aside, only dust and the scanner's border are darker.
  A dark region that touches the thumbnail's edge is the scanner border or the slide's edge, not a marker.

Coloured inks need a value of at least 50 (below it, hue and saturation are noise), so the four are disjoint.
On the thumbnail, ink pieces smaller than ``INK_MIN_AREA_UM2`` are dropped (dust and stray pixels; a marker line
is hundreds of microns wide and millimetres long), and what is left grows by ``INK_MARGIN_UM`` to take the
stroke's faint edge before it is removed from tissue. Per patch, ink is found on a copy at ``COARSE_MPP``
opened by ``INK_OPEN_PX`` pixels, so nothing as small as a nucleus (under 12 um) is ink, whatever its colour.

**Per patch** (an RGB patch at the resolution it is embedded at): *sharpness* is the variance of the Laplacian
(3 x 3) of the grey patch inside its tissue (eroded, so the tissue's edge on glass is not counted), judged
against the slide's own patches in :func:`artifact_flags`; *ink* is the share of the patch that is ink;
*fold* is the share of its tissue at ``COARSE_MPP`` whose saturation is well above the slide's ordinary tissue
(a fold doubles the tissue, so its optical density about doubles: saturation rises from about 30 % to 55 % for
eosin, and value falls where haematoxylin takes the red; at 4 um/px nuclei are averaged with their stroma, so a
nucleus alone is never a fold; the slide's own median saturation, from its thumbnail, sets the cut, since stain
strength varies from slide to slide more than a fold changes it); *background* is the share of the patch that
is not stained. A pool of blood is as saturated as a fold and can be flagged as one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from histoembed.core.config import ARTIFACTS, QCSettings
from histoembed.inputs.pixels import hue_in, to_hsv

_QC = QCSettings()
HSV = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Marker:
    """One pen colour: a hue range (None: any hue), saturation floor and value range, OpenCV HSV units."""

    name: str
    hue: tuple[float, float] | None
    min_saturation: int
    min_value: int
    max_value: int = 256


INK_DARK_VALUE = 50       # below it a pixel is black (ink, dust, border); above it coloured inks have a hue
PEN_MARKERS = (
    Marker("blue", (85.0, 122.0), 90, INK_DARK_VALUE),
    Marker("blue", (122.0, 130.0), 200, INK_DARK_VALUE),   # blue ink over pink tissue: violet, but saturated
    Marker("green", tuple(_QC.green_hue), _QC.ink_saturation, INK_DARK_VALUE),
    Marker("red", (172.0, 6.0), 190, INK_DARK_VALUE),
    Marker("black", None, 0, 0, INK_DARK_VALUE),
)
INK_MIN_AREA_UM2 = 5_000.0    # thumbnail ink pieces under this (a 70-um square) are dust, not a marker
INK_MARGIN_UM = 64.0          # ink grows by this on the thumbnail before it leaves the tissue: the stroke's edge
BORDER_MAX_VALUE = 70         # the scanner's border and the slide's edge are darker than this ...
BORDER_LINE_SHARE = 0.5       # ... on at least this share of each row or column from the image's edge inward
GLASS_MAX_SATURATION = 20     # unsaturated: glass, grey dust, not stain (the floor tissue_by_saturation keeps too)
STAIN_MIN_VALUE = 30          # stained pixels: saturation >= GLASS_MAX_SATURATION and value above this

COARSE_MPP = 4.0              # per-patch ink and fold are judged at this many um/px (nuclei averaged away)
INK_OPEN_PX = 3               # opening of the coarse ink (3 px = 12 um): nothing nucleus-sized is ink
FOLD_SATURATION_RATIO = 1.6   # fold pixel: saturation this many times the slide's median tissue saturation ...
FOLD_MIN_SATURATION = 110     # ... and never under this (43 %), however pale the slide
FOLD_DEFAULT_SATURATION = 160  # the cut when no thumbnail gives the slide's own (63 %)
FOLD_MIN_TISSUE = 0.1         # fold is not judged (0) when less of the coarse patch than this is tissue off the ink
SHARP_MIN_CONTRAST = 35.0     # structure(): a Laplacian this strong at COARSE_MPP; a nucleus, blurred or not,
                              # reaches 50-100 there, flat stroma and glass stay under 20
SHARP_MIN_PIXELS = 0.02       # sharpness is NaN (not judged) when less of the patch than this is such structure

SCORE_COLUMNS = ("sharpness", "ink_fraction", "fold_fraction", "background_fraction")
FLAG_NAMES = ARTIFACTS     # background, ink, fold, blur: the order flags are listed in

# Flag thresholds (artifact_flags). Blur is judged against the slide itself, on log sharpness: a patch is blurred
# when it is below the slide's median by more than BLUR_Z robust deviations (1.4826 x the median absolute deviation
# of the patches above the median: an out-of-focus minority widens the lower side only), where that drop is kept
# between BLUR_MIN_RATIO (tissue without nuclei, stroma alone, keeps about 1/5 of a slide's median Laplacian
# variance; an out-of-focus band of a few microns keeps 1/10 or less, down to the scanner's noise, 20 sigma^2 for
# the 3x3 kernel) and BLUR_MAX_RATIO (a varied slide, tumour beside stroma: 10x less detail than its median patch
# is out of focus whatever the spread); and always below BLUR_FLOOR.
BLUR_Z = 3.0
BLUR_MIN_RATIO = 6.0
BLUR_MAX_RATIO = 10.0
BLUR_FLOOR = 2.0              # variance of the 3x3 Laplacian (grey levels^2): flat grey, no detail at all
BLUR_MIN_PATCHES = 8          # fewer judged patches than this: only the floor applies
INK_MAX_FRACTION = 0.05       # ink on this much of the patch: flagged ink
FOLD_MAX_FRACTION = 0.25      # fold on this much of the patch's tissue: flagged fold
BACKGROUND_MAX_FRACTION = 0.8  # unstained on this much of the patch: flagged background


# ---------------------------------------------------------------- ink and background, pixel rules

def marker_pixels(rgb: np.ndarray, hsv: HSV | None = None) -> dict[str, np.ndarray]:
    """Each pen colour's pixels (bool HxW per ``PEN_MARKERS`` name), by colour alone (no shape rule); ``hsv``:
    ``to_hsv(rgb)`` when the caller has it."""
    hue, sat, val = hsv or to_hsv(rgb)
    out = {}
    for m in PEN_MARKERS:
        sel = (sat >= m.min_saturation) & (val >= m.min_value) & (val < m.max_value)
        if m.hue is not None:
            sel &= hue_in(hue, m.hue)
        out[m.name] = out[m.name] | sel if m.name in out else sel
    return out


def stained(rgb: np.ndarray, hsv: HSV | None = None) -> np.ndarray:
    """Pixels carrying stain (bool HxW): saturated enough and not black. Glass, grey and black are not."""
    _, sat, val = hsv or to_hsv(rgb)
    return (sat >= GLASS_MAX_SATURATION) & (val >= STAIN_MIN_VALUE)


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    if not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    return keep[labels]


def dark_border(rgb: np.ndarray) -> np.ndarray:
    """The scanner's dark border (bool HxW): from each side of the image inward, the lines (rows or columns) of
    which at least BORDER_LINE_SHARE is dark, as long as they run unbroken from the edge; their dark pixels.
    A black marker line that reaches the edge crosses few lines of its own side, so it stays ink."""
    _, _, val = to_hsv(rgb)
    dark = val < BORDER_MAX_VALUE
    band = np.zeros(dark.shape, bool)
    for axis, flip in ((0, False), (0, True), (1, False), (1, True)):
        share = dark.mean(axis=1 - axis)          # axis 0: rows from the top (flip: the bottom); 1: columns
        if flip:
            share = share[::-1]
        n = int(np.argmin(share >= BORDER_LINE_SHARE)) if (share < BORDER_LINE_SHARE).any() else len(share)
        if n:
            sl = slice(len(share) - n, None) if flip else slice(0, n)
            if axis == 0:
                band[sl, :] = True
            else:
                band[:, sl] = True
    return dark & band


def _disc(radius_px: int) -> np.ndarray:
    k = 2 * max(0, radius_px) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))


# ---------------------------------------------------------------- the thumbnail

@dataclass
class ThumbnailArtifacts:
    """What the thumbnail shows that is not tissue: ink by colour, the ink with its margin, the dark border."""

    colours: dict[str, np.ndarray]   # ink pixels per pen colour (bool HxW), small pieces dropped
    ink: np.ndarray                  # any ink (bool HxW)
    margin: np.ndarray               # ink grown by INK_MARGIN_UM (bool HxW)
    border: np.ndarray               # dark regions touching the edge (bool HxW)

    @property
    def excluded(self) -> np.ndarray:
        """Pixels that are never tissue: ink with its margin, and the border."""
        return self.margin | self.border

    def ink_fractions(self) -> dict[str, float]:
        """Each colour's share of the thumbnail (for the console and the run)."""
        n = max(1, self.ink.size)
        return {k: float(v.sum() / n) for k, v in self.colours.items()}


def thumbnail_artifacts(rgb: np.ndarray, thumb_mpp: float, margin_um: float = INK_MARGIN_UM,
                        min_area_um2: float = INK_MIN_AREA_UM2) -> ThumbnailArtifacts:
    """Pen ink (by colour, pieces under ``min_area_um2`` dropped, grown by ``margin_um``) and the dark scanner
    border on an RGB thumbnail of ``thumb_mpp`` microns per pixel."""
    border = dark_border(rgb)
    raw = {k: v & ~border for k, v in marker_pixels(rgb).items()}
    ink = np.zeros(rgb.shape[:2], bool)
    for v in raw.values():
        ink |= v
    ink = _drop_small(ink, min_area_um2 / (thumb_mpp * thumb_mpp))   # pieces of any colour: a stroke crossing
    colours = {k: v & ink for k, v in raw.items()}                   # another is one piece
    r = math.ceil(margin_um / thumb_mpp)
    margin = cv2.dilate(ink.astype(np.uint8), _disc(r)).astype(bool) if ink.any() and r > 0 else ink.copy()
    return ThumbnailArtifacts(colours, ink, margin, border)


def without_artifacts(rgb: np.ndarray, arts: ThumbnailArtifacts) -> np.ndarray:
    """A copy of the thumbnail with ink (and its margin) and the border painted as glass, so that Otsu's split of
    saturation is not pulled up by saturated ink (remove ``arts.excluded`` from the tissue found afterwards too:
    hole filling closes a painted ring)."""
    out = rgb.copy()
    out[arts.excluded] = 255
    return out


# ---------------------------------------------------------------- one patch

def _coarse(rgb: np.ndarray, mpp: float) -> np.ndarray:
    factor = mpp / COARSE_MPP
    if factor >= 1:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(4, round(w * factor)), max(4, round(h * factor)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def patch_ink(coarse: np.ndarray, hsv: HSV | None = None) -> np.ndarray:
    """Ink on a patch at COARSE_MPP (bool HxW): marker colours, opened so nothing nucleus-sized remains."""
    any_ink = np.zeros(coarse.shape[:2], np.uint8)
    for v in marker_pixels(coarse, hsv).values():
        any_ink |= v.astype(np.uint8)
    if not any_ink.any():
        return any_ink.astype(bool)
    return cv2.morphologyEx(any_ink, cv2.MORPH_OPEN, np.ones((INK_OPEN_PX, INK_OPEN_PX), np.uint8)).astype(bool)


def fold_saturation(thumb: np.ndarray, tissue: np.ndarray) -> float:
    """The saturation above which a pixel is doubled tissue on this slide: FOLD_SATURATION_RATIO times the median
    saturation of the thumbnail's ``tissue`` (ink and border already out), never under FOLD_MIN_SATURATION."""
    if not tissue.any():
        return float(FOLD_DEFAULT_SATURATION)
    _, sat, _ = to_hsv(thumb)
    return float(min(250.0, max(FOLD_MIN_SATURATION, FOLD_SATURATION_RATIO * float(np.median(sat[tissue])))))


def fold_pixels(coarse: np.ndarray, cut: float = FOLD_DEFAULT_SATURATION, hsv: HSV | None = None) -> np.ndarray:
    """Doubled tissue on a patch at COARSE_MPP (bool HxW): saturation of at least ``cut`` (``fold_saturation``),
    not black."""
    _, sat, val = hsv or to_hsv(coarse)
    return (sat >= cut) & (val >= INK_DARK_VALUE)


def structure(coarse: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Where a patch at COARSE_MPP has structure of nuclear size (bool HxW): the 3x3 Laplacian of its grey reaches
    SHARP_MIN_CONTRAST within ``inner``, grown by a pixel. A nucleus is such a blob at 4 um/px whether in focus or
    not; flat stroma and the ramp of a tissue's edge are not, and cannot tell focus from blur."""
    grey = cv2.cvtColor(np.ascontiguousarray(coarse), cv2.COLOR_RGB2GRAY)
    strong = (np.abs(cv2.Laplacian(grey, cv2.CV_32F, ksize=1)) >= SHARP_MIN_CONTRAST) & inner.astype(bool)
    strong[[0, -1], :] = strong[:, [0, -1]] = False      # the Laplacian's edge pixels see a reflected border
    if not strong.any():
        return strong
    return cv2.dilate(strong.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & inner.astype(bool)


def sharpness(rgb: np.ndarray, where: np.ndarray) -> float:
    """Variance of the 3x3 Laplacian of the grey patch over ``where`` (its tissue's structure); NaN when that is
    under SHARP_MIN_PIXELS of the patch."""
    mask = where.astype(np.uint8)
    if cv2.countNonZero(mask) < SHARP_MIN_PIXELS * mask.size:
        return math.nan
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=1)
    _, sd = cv2.meanStdDev(lap, mask=mask)
    return float(sd[0, 0] ** 2)


def score_patch(rgb: np.ndarray, mpp: float, fold_cut: float = FOLD_DEFAULT_SATURATION) -> dict[str, float]:
    """The artifact scores of one RGB patch read at ``mpp`` microns per pixel (``SCORE_COLUMNS``); ``fold_cut``:
    the slide's ``fold_saturation``. Masks are made at COARSE_MPP (one colour conversion of a small copy); only
    the Laplacian runs at the patch's own resolution."""
    coarse = _coarse(rgb, mpp)
    hsv = to_hsv(coarse)
    ink = patch_ink(coarse, hsv)
    near_ink = cv2.dilate(ink.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # ink's faint edge
    stain = stained(coarse, hsv)
    tissue = stain & ~near_ink
    fold = fold_pixels(coarse, fold_cut, hsv) & tissue
    inner = cv2.erode(tissue.astype(np.uint8), np.ones((3, 3), np.uint8))   # one coarse pixel: 4 um
    where = structure(coarse, inner).astype(np.uint8)
    if where.shape != rgb.shape[:2]:
        where = cv2.resize(where, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    n_tissue = int(tissue.sum())
    judged = n_tissue > 0 and n_tissue >= FOLD_MIN_TISSUE * tissue.size
    return {"sharpness": sharpness(rgb, where),
            "ink_fraction": float(ink.mean()),
            "fold_fraction": float(fold.sum() / n_tissue) if judged else 0.0,
            "background_fraction": float(1.0 - (stain | ink).mean())}


# ---------------------------------------------------------------- a slide's flags

@dataclass(frozen=True)
class BlurCut:
    """How blur was judged on one slide: the median sharpness, the cut under which a patch is blurred, how many
    patches were judged (finite sharpness)."""

    median: float
    cut: float
    judged: int


def blur_cut(values: np.ndarray) -> BlurCut:
    """The slide's blur cut from its patches' sharpness (module docstring: BLUR_* constants)."""
    s = np.asarray(values, np.float64)
    s = s[np.isfinite(s)]
    if len(s) < BLUR_MIN_PATCHES:
        return BlurCut(float(np.median(s)) if len(s) else math.nan, BLUR_FLOOR, len(s))
    logs = np.log(np.maximum(s, 1e-6))
    med = float(np.median(logs))
    sd = 1.4826 * float(np.median(logs[logs >= med] - med))   # the sharp side's spread: blur only ever lowers
    drop = min(max(BLUR_Z * sd, math.log(BLUR_MIN_RATIO)), math.log(BLUR_MAX_RATIO))
    return BlurCut(math.exp(med), max(BLUR_FLOOR, math.exp(med - drop)), len(s))


def artifact_flags(scores: dict[str, np.ndarray]) -> tuple[list[list[str]], BlurCut]:
    """Each patch's flags (a list among ``FLAG_NAMES``, empty when usable) from one slide's ``SCORE_COLUMNS``
    arrays, and the blur cut used. A NaN sharpness (too little tissue to judge) is never blur."""
    sharp = np.asarray(scores["sharpness"], np.float64)
    cut = blur_cut(sharp)
    tests = {"background": np.asarray(scores["background_fraction"]) >= BACKGROUND_MAX_FRACTION,
             "ink": np.asarray(scores["ink_fraction"]) >= INK_MAX_FRACTION,
             "fold": np.asarray(scores["fold_fraction"]) >= FOLD_MAX_FRACTION,
             "blur": np.isfinite(sharp) & (sharp < cut.cut)}
    flags = [[name for name in FLAG_NAMES if tests[name][i]] for i in range(len(sharp))]
    return flags, cut


def flag_fractions(flags: list[list[str]]) -> dict[str, float]:
    """Each cause's share of a slide's patches, and the usable share (no flag)."""
    n = max(1, len(flags))
    out = {name: sum(name in f for f in flags) / n for name in FLAG_NAMES}
    out["usable"] = sum(not f for f in flags) / n
    return out


def usable(flags: list[str], keep: tuple[str, ...] | frozenset[str] = ()) -> bool:
    """True when every flag of a patch is one the user keeps (``--keep-artifacts``)."""
    return all(f in keep for f in flags)
