"""Slide artifacts without model weights (issue 31): pen ink by colour and the scanner's border on a thumbnail, and
blur, ink, fold and background per patch, each rule measured against truth planted in an image drawn here."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from histoembed.inputs import artifacts as A
from histoembed.inputs import slides

MPP = 1.0            # microns per pixel of the drawn image
N = 1280             # its side
PATCH = 64           # patch side (64 um)
THUMB = 8            # thumbnail downsample (8 um/px, crops' default --thumb-mpp)
H_OD = np.array([0.65, 0.70, 0.29], np.float32)     # haematoxylin, eosin (Ruifrok & Johnston)
E_OD = np.array([0.07, 0.99, 0.11], np.float32)
INK_OD = {"blue": (1.6, 0.9, 0.15), "green": (1.3, 0.25, 1.1), "red": (0.1, 2.0, 1.7), "black": (2.6, 2.6, 2.6)}
STROKES = {"blue": ((0, 100), (800, 560)), "green": ((1279, 190), (620, 720)),   # each from glass into tissue
           "red": ((190, 1279), (560, 720)), "black": ((1180, 1279), (780, 780))}


def _smooth(rng: np.random.Generator, cells: int) -> np.ndarray:
    return cv2.resize(rng.random((cells, cells), np.float32), (N, N), interpolation=cv2.INTER_CUBIC)


def planted(seed: int = 0, artifacts: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """An H&E-like image (Beer-Lambert: nuclei of haematoxylin in textured eosin stroma, an ellipse of tissue on
    glass) and, with ``artifacts``, a marker stroke of each colour over glass and tissue, a fold (the tissue's
    optical density x 2.3), a Gaussian-blurred band (sigma 3 um) and a dark scanner border; the truth as masks."""
    rng = np.random.default_rng(seed)
    tissue = np.zeros((N, N), np.float32)
    cv2.ellipse(tissue, (N // 2, N // 2), (int(0.42 * N), int(0.40 * N)), 0, 0, 360, 1.0, -1)
    tissue = cv2.GaussianBlur(tissue, (0, 0), 3)
    inside = tissue > 0.5
    fibres = cv2.GaussianBlur(rng.random((N, N), np.float32), (0, 0), 1.5)
    e = (0.3 + 0.3 * _smooth(rng, 25) + 5.0 * (fibres - 0.5)) * tissue
    seeds = (rng.random((N, N), np.float32) < 0.004 * _smooth(rng, 4)) & inside
    nuclei = cv2.dilate(seeds.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    h = nuclei * (0.8 + 0.4 * _smooth(rng, 12)) * tissue + 0.08 * tissue
    none = np.zeros((N, N), bool)
    truth = {"tissue": inside, "fold": none, "blur": none, "border": none.copy()}
    truth.update({name: none for name in STROKES})
    if artifacts:
        fold = none.copy()
        fold[250:460, 300:960] = True
        truth["fold"] = fold & inside
    f = np.where(truth["fold"], np.float32(2.3), np.float32(1.0))
    od = (h * f)[..., None] * H_OD + (np.maximum(e, 0) * f)[..., None] * E_OD
    for name, (p, q) in STROKES.items() if artifacts else ():
        line = np.zeros((N, N), np.uint8)
        cv2.line(line, p, q, 1, 80)
        od += cv2.GaussianBlur(line.astype(np.float32), (0, 0), 3)[..., None] * np.float32(INK_OD[name])
        truth[name] = line.astype(bool)
    rgb = 245.0 * np.exp(-od)
    if artifacts:
        band = none.copy()
        band[780:1040] = True
        rgb[band] = cv2.GaussianBlur(rgb, (0, 0), 3.0)[band]
        truth["blur"] = band & inside
    rgb = np.clip(rgb + rng.normal(0, 2.0, (N, N, 1)).astype(np.float32), 0, 255).astype(np.uint8)  # sensor noise
    if artifacts:
        rgb[:, :32] = (18, 20, 22)
        truth["border"][:, :32] = True
    return rgb, truth


def _small(mask: np.ndarray) -> np.ndarray:
    """A truth mask at the thumbnail's scale: the pixels it wholly covers."""
    return cv2.resize(mask.astype(np.float32), (N // THUMB, N // THUMB), interpolation=cv2.INTER_AREA) > 0.99


def _per_patch(mask: np.ndarray) -> np.ndarray:
    return mask.reshape(N // PATCH, PATCH, N // PATCH, PATCH).mean(axis=(1, 3)).ravel()


def _centres(mask: np.ndarray) -> np.ndarray:
    c = PATCH // 2
    return mask[c::PATCH, c::PATCH].ravel()


@pytest.fixture(scope="module")
def drawn():
    rgb, truth = planted()
    thumb = cv2.resize(rgb, (N // THUMB, N // THUMB), interpolation=cv2.INTER_AREA)
    return rgb, truth, thumb, A.thumbnail_artifacts(thumb, MPP * THUMB)


def _tissue(thumb: np.ndarray, arts: A.ThumbnailArtifacts) -> np.ndarray:
    found = slides.tissue_by_saturation(A.without_artifacts(thumb, arts), MPP * THUMB, 10_000)
    return found & ~arts.excluded


def test_thumbnail_finds_each_marker_and_keeps_ink_and_border_out_of_tissue(drawn):
    _, truth, thumb, arts = drawn
    any_ink = np.zeros_like(arts.ink)
    for name in STROKES:
        stroke = _small(truth[name])
        any_ink |= stroke
        assert (arts.ink & stroke).sum() / stroke.sum() >= 0.95, name           # recall, any colour
        others = [truth[k] for k in (*STROKES, "tissue", "border") if k != name]     # ink over glass alone
        on_glass = stroke & _small(cv2.dilate(np.logical_or.reduce(others).astype(np.uint8),
                                               np.ones((40, 40), np.uint8)) == 0)
        assert (arts.colours[name] & on_glass).sum() / on_glass.sum() >= 0.95, name   # named by its colour
    near = cv2.dilate(any_ink.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert (arts.ink & ~near).sum() <= 0.02 * arts.ink.sum()                   # precision
    border = _small(truth["border"])
    assert (arts.border == border).mean() > 0.995 and not (arts.ink & border).any()
    before = slides.tissue_by_saturation(thumb, MPP * THUMB, 10_000)
    after = _tissue(thumb, arts)
    assert (before & any_ink).sum() > 0.5 * any_ink.sum()                     # Otsu alone takes ink for tissue
    assert not (after & any_ink).any() and not (after & border).any()
    clean = _small(truth["tissue"]) & ~cv2.dilate(near.astype(np.uint8), np.ones((19, 19), np.uint8)).astype(bool)
    assert (after & clean).sum() >= 0.98 * clean.sum()                         # the rest of the tissue stays


def test_patch_flags_against_planted_truth(drawn):
    rgb, truth, thumb, arts = drawn
    cut = A.fold_saturation(thumb, _tissue(thumb, arts))
    rows = [A.score_patch(rgb[y:y + PATCH, x:x + PATCH], MPP, cut)
            for y in range(0, N, PATCH) for x in range(0, N, PATCH)]
    flags, blur = A.artifact_flags({k: np.array([r[k] for r in rows]) for k in A.SCORE_COLUMNS})
    has = {k: np.array([k in f for f in flags]) for k in A.FLAG_NAMES}
    ink = _per_patch(np.logical_or.reduce([truth[k] for k in STROKES]))
    tissue, band, fold, border = (_per_patch(truth[k]) for k in ("tissue", "blur", "fold", "border"))
    artifact = np.maximum.reduce([ink, band, fold, border])
    grid = tissue >= 0.5                                                      # crops' --min-tissue
    clean = grid & (artifact == 0)
    assert clean.sum() > 60 and np.mean([bool(f) for f, c in zip(flags, clean) if c]) < 0.02

    in_band = (band == 1) & (ink == 0)
    assert in_band.sum() >= 10 and has["blur"][in_band].mean() >= 0.9
    assert (band > 0)[has["blur"] & (ink == 0)].mean() >= 0.9                 # blur precision (off the ink)
    assert blur.cut < blur.median / A.BLUR_MIN_RATIO

    in_fold = (fold == 1) & (ink == 0)
    assert in_fold.sum() >= 6 and has["fold"][in_fold].mean() >= 0.9
    assert (fold > 0)[has["fold"]].mean() >= 0.9

    on_ink = _centres(np.logical_or.reduce([truth[k] for k in STROKES]))
    assert has["ink"][on_ink].all()                                          # no patch centred on ink is kept
    assert ((ink > 0) | (border > 0))[has["ink"]].all()                      # precision (black = border too)

    glass = (tissue == 0) & (artifact == 0)
    assert glass.sum() > 20 and has["background"][glass].all()
    assert not has["background"][clean].any()


def test_clean_tissue_loses_under_two_percent_of_its_patches():
    rgb, truth = planted(seed=3, artifacts=False)
    thumb = cv2.resize(rgb, (N // THUMB, N // THUMB), interpolation=cv2.INTER_AREA)
    arts = A.thumbnail_artifacts(thumb, MPP * THUMB)
    assert not arts.ink.any() and not arts.border.any()
    cut = A.fold_saturation(thumb, _tissue(thumb, arts))
    grid = _per_patch(truth["tissue"]) >= 0.5
    boxes = [(y, x) for i, (y, x) in enumerate((y, x) for y in range(0, N, PATCH) for x in range(0, N, PATCH))
             if grid[i]]
    rows = [A.score_patch(rgb[y:y + PATCH, x:x + PATCH], MPP, cut) for y, x in boxes]
    flags, _ = A.artifact_flags({k: np.array([r[k] for r in rows]) for k in A.SCORE_COLUMNS})
    fractions = A.flag_fractions(flags)
    assert len(flags) > 200 and fractions["usable"] > 0.98, fractions


def test_flags_on_few_patches_keep_to_the_floor_and_keep_restores():
    scores = {"sharpness": np.array([500.0, 1.0, np.nan]), "ink_fraction": np.array([0.0, 0.0, 0.3]),
              "fold_fraction": np.array([0.5, 0.0, 0.0]), "background_fraction": np.array([0.1, 0.1, 0.9])}
    flags, cut = A.artifact_flags(scores)
    assert cut.cut == A.BLUR_FLOOR and cut.judged == 2
    assert flags == [["fold"], ["blur"], ["background", "ink"]]
    assert [A.usable(f, ("fold",)) for f in flags] == [True, False, False]
    assert A.flag_fractions(flags)["usable"] == 0
