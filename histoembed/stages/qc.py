"""Quality control: flag images a classifier should not learn from, and repair green ink.

Two passes over every image (both splits):

* **Colour pass** (no model, on a copy downscaled to ``MAX_SIDE``): HSV fractions of
  green, brown, yellow and blue pixels, a green-ink mask (Otsu on saturation within the
  ink hue range), the tissue fraction by colour, the mask's area and how much of it is
  tissue. H&E is pink and purple on a white slide; a pasted photograph or cartoon shows
  colours no H&E stain makes (browns, yellows, greens, blues), near-black shadows, or
  large flat areas of one colour. Each of ``non_tissue``, ``ink`` and ``blank`` comes
  with the scores behind it in ``reason``.
* **Embedding pass** (a thumbnail of each image's tissue through the QC encoder, by
  default the packaged EfficientNet-Lite0: ImageNet features tell a photograph from
  tissue, and QC must not depend on the embed stage that runs after it): each image's
  embedding gives a kNN outlier score
  (mean cosine distance to the k nearest images, as a robust z-score) and, with a
  perceptual hash, near-duplicate groups.

``flagged`` = non_tissue or ink or blank or outlier. Near-duplicates are *not* flagged:
they stay in training and the fit stage keeps each ``duplicate_group`` (near-duplicates
within one split) inside one fold, so no copy leaks into its own evaluation fold and no
data is thrown away. A test image that nearly duplicates a training image is listed in
``near_train`` (the closest training image, with its hash distance and cosine) as a
warning about leakage; it is never dropped.

Mask twins: training images whose mask *files* are byte-identical (sha256; empty masks
aside) are listed in pairs in ``mask_twin``. In the reference challenge a cartoon pasted over a tissue image
reuses that image's mask, so the member the colour pass marks ``non_tissue`` is the paste;
its reason names the image it shares the mask with. ``--keep``
un-flags single images. Test images get the same columns, but later stages never drop
them; images with ``ink`` are repaired by :func:`histoembed.inputs.pixels.repair_ink` when the crops stage reads
them (source files are never modified).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from histoembed.core import store
from histoembed.core.config import QCSettings
from histoembed.core.console import progress
from histoembed.core.errors import UserError
from histoembed.inputs.dataset import (
    MAX_PIXELS,
    Problem,
    Sample,
    load_dataset,
    read_image_and_mask,
    read_slide_thumbnail,
)
from histoembed.inputs.provenance import SAMPLE_STAMPS, checked_stamps
from histoembed.inputs.pixels import hue_in, ink_mask, to_hsv, tissue_mask_by_colour

MAX_SIDE = 512          # the colour pass works on images downscaled to this longest side
HASH_SIZE = 16          # perceptual hash of HASH_SIZE**2 bits
QC_VERSION = 2          # bump when a score's definition changes (part of the skip key)

SCORE_COLUMNS = ("green_fraction", "brown_fraction", "yellow_fraction", "blue_fraction",
                 "off_palette_fraction", "he_share", "dark_fraction", "flat_fraction",
                 "ink_fraction", "tissue_fraction", "mask_fraction", "tissue_in_mask",
                 "knn_distance", "knn_z")


# ---------------------------------------------------------------- colour maths (pure)

def downscale(rgb: np.ndarray, mask: np.ndarray | None = None, max_side: int = MAX_SIDE):
    """Shrink so the longest side is at most ``max_side`` (area averaging; masks by nearest)."""
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return rgb, mask
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    if mask is not None:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    return small, mask


def flat_fraction(rgb: np.ndarray, foreground: np.ndarray, window: int = 7, max_std: float = 1.5) -> float:
    """Share of the foreground in windows of (almost) one colour: cartoons and graphics, not tissue."""
    if not foreground.any():
        return 0.0
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mean = cv2.blur(gray, (window, window))
    sq = cv2.blur(gray * gray, (window, window))
    std = np.sqrt(np.maximum(sq - mean * mean, 0))
    return float(np.mean(std[foreground] <= max_std))


def colour_scores(rgb: np.ndarray, mask: np.ndarray | None, settings: QCSettings) -> dict[str, float]:
    """Every colour score of one image (already downscaled); fractions are of all pixels."""
    hue, sat, val = to_hsv(rgb)
    n = hue.size
    ink = ink_mask(rgb, settings)
    coloured = (sat >= settings.min_saturation) & (val >= settings.dark_value)
    plain = coloured & ~ink  # coloured pixels that are not ink
    green = plain & hue_in(hue, settings.green_hue)
    brown = coloured & hue_in(hue, settings.brown_hue)
    yellow = coloured & hue_in(hue, settings.yellow_hue)
    blue = coloured & hue_in(hue, settings.blue_hue)
    he = plain & hue_in(hue, settings.tissue_hue)
    tissue = tissue_mask_by_colour(rgb) & ~ink
    dark = val < settings.dark_value
    background = (sat < settings.min_saturation) & (val >= 200)
    scores = {
        "green_fraction": green.sum() / n,
        "brown_fraction": brown.sum() / n,
        "yellow_fraction": yellow.sum() / n,
        "blue_fraction": blue.sum() / n,
        "off_palette_fraction": (green | brown | yellow | blue).sum() / n,
        "he_share": he.sum() / max(int(plain.sum()), 1),
        "dark_fraction": dark.sum() / n,
        "flat_fraction": flat_fraction(rgb, ~background & ~dark),
        "ink_fraction": ink.sum() / n,
        "tissue_fraction": tissue.sum() / n,
        "mask_fraction": np.nan,
        "tissue_in_mask": np.nan,
    }
    if mask is not None:
        inside = mask > 0
        scores["mask_fraction"] = inside.sum() / n
        scores["tissue_in_mask"] = (tissue & inside).sum() / inside.sum() if inside.any() else 0.0
    return {k: float(v) for k, v in scores.items()}


def colour_flags(scores: dict[str, float], settings: QCSettings) -> tuple[bool, bool, bool, list[str]]:
    """(non_tissue, ink, blank, reasons) from :func:`colour_scores`."""
    reasons: list[str] = []
    why = []
    if scores["off_palette_fraction"] >= settings.non_tissue_fraction:
        why.append(f"{scores['off_palette_fraction']:.0%} of pixels in colours H&E does not make "
                   f"(brown {scores['brown_fraction']:.0%}, yellow {scores['yellow_fraction']:.0%}, "
                   f"green {scores['green_fraction']:.0%}, blue {scores['blue_fraction']:.0%}; "
                   f"limit {settings.non_tissue_fraction:.0%})")
    if scores["dark_fraction"] >= settings.max_dark_fraction:
        why.append(f"{scores['dark_fraction']:.0%} near-black pixels (limit {settings.max_dark_fraction:.0%})")
    if scores["flat_fraction"] >= settings.max_flat_fraction:
        why.append(f"{scores['flat_fraction']:.0%} of the picture in flat single-colour areas "
                   f"(limit {settings.max_flat_fraction:.0%})")
    if scores["ink_fraction"] >= settings.max_ink_fraction:
        why.append(f"{scores['ink_fraction']:.0%} of the picture is green (limit {settings.max_ink_fraction:.0%})")
    non_tissue = bool(why)
    if non_tissue:
        reasons.append("non_tissue: " + "; ".join(why))
    ink = scores["ink_fraction"] >= settings.ink_fraction and not non_tissue  # ink is a mark on tissue
    if ink:
        reasons.append(f"ink: {scores['ink_fraction']:.1%} green-ink pixels (limit {settings.ink_fraction:.1%})")
    if np.isnan(scores["mask_fraction"]):
        blank = scores["tissue_fraction"] < settings.min_tissue_in_mask
        if blank:
            reasons.append(f"blank: no mask and {scores['tissue_fraction']:.1%} tissue by colour "
                           f"(limit {settings.min_tissue_in_mask:.0%})")
    elif scores["mask_fraction"] == 0:
        blank = True
        reasons.append("blank: the mask is empty")
    else:
        blank = scores["tissue_in_mask"] < settings.min_tissue_in_mask
        if blank:
            reasons.append(f"blank: {scores['tissue_in_mask']:.1%} of the mask is tissue "
                           f"(limit {settings.min_tissue_in_mask:.0%})")
    return non_tissue, ink, blank, reasons


# ---------------------------------------------------------------- embeddings and hashes (pure)

def perceptual_hash(rgb: np.ndarray) -> np.ndarray:
    """256-bit DCT hash of the grey image (imagehash.phash, 16 x 16), as a bool vector.

    The 64-bit default hash mostly encodes the layout (a tissue blob on white), so distinct
    slides came as close as 4 bits; at 256 bits they stay >= 58 bits apart while resized,
    JPEG-recompressed copies stay within 10 (measured; see the QC issue note).
    """
    import imagehash  # pulls scipy: loaded only when QC runs

    return imagehash.phash(Image.fromarray(rgb).convert("L"), hash_size=HASH_SIZE).hash.flatten()


def hash_distances(bits: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances of hashes [N, B] (bool), as an [N, N] int matrix."""
    b = bits.astype(np.int32)
    return b @ (1 - b).T + (1 - b) @ b.T


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_distance(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance of each row to its k nearest other rows."""
    u = unit_rows(embeddings)
    dist = 1.0 - u @ u.T
    np.fill_diagonal(dist, np.inf)
    k = min(k, len(u) - 1)
    return np.sort(dist, axis=1)[:, :k].mean(axis=1)


def robust_z(x: np.ndarray, min_scale: float = 0.05) -> np.ndarray:
    """(x - median) / (1.4826 MAD), the MAD floored at ``min_scale`` x median.

    The floor keeps a set of near-identical clean images (MAD ~ 0) from turning tiny
    differences into huge z-scores.
    """
    med = float(np.median(x))
    mad = 1.4826 * float(np.median(np.abs(x - med)))
    return (x - med) / max(mad, min_scale * abs(med), 1e-12)


def centred_cosine(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity after removing the dataset mean.

    Every tissue image shares a large common component; without centring, any encoder
    puts most pairs of different images above 0.98. Exact copies stay at 1.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    u = unit_rows(x - x.mean(axis=0, keepdims=True))
    return u @ u.T


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def duplicate_pairs(hashes: np.ndarray, similarity: np.ndarray | None,
                    settings: QCSettings) -> list[tuple[int, int, str]]:
    """(i, j, why) for every near-duplicate pair: close hashes [N, B] or near-identical embeddings."""
    dist = hash_distances(hashes)
    close = dist <= settings.hash_distance
    similar = np.zeros_like(close)
    if similarity is not None:
        similar = np.nan_to_num(similarity, nan=-1.0) >= settings.duplicate_cosine
    pairs = []
    for i, j in zip(*np.nonzero(np.triu(close | similar, k=1))):
        why = []
        if close[i, j]:
            why.append(f"hash distance {dist[i, j]}")
        if similar[i, j]:
            why.append(f"cosine {similarity[i, j]:.3f}")
        pairs.append((int(i), int(j), ", ".join(why)))
    return pairs


def mask_twins(digests: Sequence[str | None]) -> list[list[int]]:
    """Groups (two or more, in order) of indices whose mask files have the same sha256; None never matches."""
    by_digest: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        if d is not None:
            by_digest.setdefault(d, []).append(i)
    return [g for g in by_digest.values() if len(g) > 1]


def duplicate_groups(n: int, pairs: Iterable[tuple[int, int, str]]) -> list[int | None]:
    """Group numbers 0.. (in order of each group's first image) by union-find; None when alone."""
    uf = _UnionFind(n)
    for i, j, _ in pairs:
        uf.union(i, j)
    roots = [uf.find(i) for i in range(n)]
    sizes: dict[int, int] = {}
    for r in roots:
        sizes[r] = sizes.get(r, 0) + 1
    numbers: dict[int, int] = {}
    groups: list[int | None] = []
    for r in roots:
        if sizes[r] < 2:
            groups.append(None)
            continue
        numbers.setdefault(r, len(numbers))
        groups.append(numbers[r])
    return groups


# ---------------------------------------------------------------- per-image work

def tissue_box(mask: np.ndarray | None, tissue: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around the mask, else around tissue by colour, else the whole image."""
    for m in (mask > 0 if mask is not None else None, tissue):
        if m is not None and m.any():
            ys, xs = np.nonzero(m)
            return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    h, w = tissue.shape
    return 0, 0, w, h


def thumbnail(rgb: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The box padded to a square with white (slide background) and resized to size x size."""
    x0, y0, x1, y1 = box
    crop = rgb[y0:y1, x0:x1]
    h, w = crop.shape[:2]
    side = max(h, w)
    square = np.full((side, side, 3), 255, np.uint8)
    oy, ox = (side - h) // 2, (side - w) // 2
    square[oy:oy + h, ox:ox + w] = crop
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)


@dataclass
class _ImageResult:
    scores: dict[str, float] | None = None
    phash: np.ndarray | None = None
    thumb: np.ndarray | None = None
    mask_sha256: str | None = None
    problem: str | None = None


def _check_image(args: tuple[Sample, QCSettings, int]) -> _ImageResult:
    """Colour scores, hash and (when ``thumb_size``) a thumbnail of one image."""
    sample, settings, thumb_size = args
    try:
        if sample.slide:  # a whole slide: its thumbnail (read tile by tile) stands for it
            rgb, mask = read_slide_thumbnail(sample)
        else:
            rgb, mask = read_image_and_mask(sample.image, sample.mask, max_pixels=None)  # checked by load_dataset
    except UserError as e:
        return _ImageResult(problem=f"{e.path or sample.image}: {e.problem}")
    small, small_mask = downscale(rgb, mask)
    scores = colour_scores(small, small_mask, settings)
    thumb = None
    if thumb_size:
        thumb = thumbnail(small, tissue_box(small_mask, tissue_mask_by_colour(small)), thumb_size)
    # An empty mask says nothing about which tissue it was drawn for: same-size empty masks are not twins.
    mask_sha = hashlib.sha256(sample.mask.read_bytes()).hexdigest() if mask is not None and mask.any() else None
    return _ImageResult(scores, perceptual_hash(small), thumb, mask_sha)


def _map_images(samples: list[Sample], settings: QCSettings, thumb_size: int) -> list[_ImageResult]:
    jobs = [(s, settings, thumb_size) for s in samples]
    workers = settings.workers or min(os.cpu_count() or 1, 8)
    results: list[_ImageResult] = []
    with progress("images") as bar:
        task = bar.add_task("qc colour pass", total=len(jobs))
        if workers <= 1 or len(jobs) < 16:
            for job in jobs:
                results.append(_check_image(job))
                bar.advance(task)
        else:
            with ProcessPoolExecutor(workers) as pool:
                for r in pool.map(_check_image, jobs, chunksize=4):
                    results.append(r)
                    bar.advance(task)
    return results


# ---------------------------------------------------------------- embedding pass

def _load_encoder(name: str):
    """(encoder, input size) or (None, why) when it cannot be loaded."""
    from histoembed.models import encoders  # torch: loaded only for the embedding pass

    try:
        enc = encoders.load_encoder(name)
    except UserError as e:
        return None, str(e)
    except (OSError, ValueError, RuntimeError) as e:
        return None, f"{type(e).__name__}: {e}"
    return enc, enc.size


def _embed_thumbnails(encoder, thumbs: np.ndarray) -> np.ndarray:
    """[N, D] embeddings of uint8 thumbnails [N, H, W, 3], one clean view each."""
    from histoembed.engines.forward import embed_crops  # torch

    return embed_crops(encoder, thumbs, views=1)


# ---------------------------------------------------------------- the stage

@dataclass
class QCResult:
    path: Path
    table: pa.Table
    skipped: bool                                   # True: inputs and settings unchanged, nothing done
    problems: list[Problem] = field(default_factory=list)  # images that could not be read
    embedding: str = ""                             # where embeddings came from, or why there were none
    warning: str | None = None                      # what the user should know and can fix (e.g. no encoder)

    def count(self, column: str) -> int:
        col = self.table[column].to_pylist()
        return sum(1 for v in col if v) if column != "duplicate_group" else sum(v is not None for v in col)

    def near_train(self) -> list[tuple[str, str, int, float | None]]:
        """(test image, closest training image, hash distance, cosine) for every possible leak."""
        t = self.table.to_pydict()
        return [(i, n, d, c) for i, n, d, c in zip(t["image_id"], t["near_train"], t["near_train_hash_distance"],
                                                   t["near_train_cosine"]) if n is not None]

    def mask_twins(self) -> list[tuple[str, str]]:
        """(image, image) pairs of training images with byte-identical mask files, each pair once."""
        t = self.table.to_pydict()
        pairs = set()
        for i, twins in zip(t["image_id"], t["mask_twin"]):
            for j in twins or []:
                pairs.add(tuple(sorted((i, j))))
        return sorted(pairs)

    def flagged(self) -> list[tuple[str, str, str]]:
        """(image_id, split, reason) of every flagged image."""
        t = self.table.to_pydict()
        return [(i, s, r) for i, s, f, r in zip(t["image_id"], t["split"], t["flagged"], t["reason"]) if f]


def _qc_table(rows: list[dict]) -> pa.Table:
    fields = list(store.QC_SCHEMA) + [pa.field(c, pa.float32()) for c in SCORE_COLUMNS]
    schema = pa.schema(fields)
    return pa.Table.from_pylist(rows, schema=schema)


def _previous_result(out: Path, meta: dict, warning: str | None = None) -> QCResult:
    problems = [Problem(Path(p), why) for p, why in meta.get("problems", [])]
    return QCResult(out, store.read_qc(out.parent), skipped=True, problems=problems,
                    embedding=meta.get("embedding", ""), warning=warning)


def run_qc(data: Path, run: Path, settings: QCSettings, embed: bool = True, encoder: str | None = None,
           keep: Sequence[str] = (), strict: bool = False, max_pixels: int = MAX_PIXELS) -> QCResult:
    """Check every image of ``data`` and write ``run/qc.parquet`` (skipped when unchanged)."""
    data, run = Path(data), Path(run)
    out = run / store.QC_FILE
    store.remove_stale(run, ".*.tmp-*")  # what killed runs left
    ds = load_dataset(data, strict=strict, max_pixels=max_pixels)
    samples = ds.samples
    known = {s.image_id for s in ds.split("train")}
    unknown = [k for k in keep if k not in known]
    if unknown:
        raise UserError(f"--keep names image(s) not in the training data: {', '.join(unknown)}", path=data,
                        hint="use training image ids as in train_labels.csv / the manifest, e.g. img_0003.png "
                             "(test images are never left out)")

    enc_name = (encoder or settings.encoder) if embed else None
    stamp = store.ContentStamps(store.read_meta(out).get("content_stamps") if out.exists() else None)
    checked = checked_stamps(samples, stamp)
    key = store.stage_key(
        "qc", QC_VERSION, settings, sorted(keep),
        [[image_id, split, image, mask] for split, image_id, image, mask in checked],
        enc_name, [str(p) for p in ds.problems],
    )
    old = store.read_meta(out) if out.exists() else {}
    # older files (another schema, or no record of the bytes checked, which crops compares): re-run
    unchanged = old.get("key") == key and old.get("schema") == store.SCHEMA and SAMPLE_STAMPS in old
    leak = "; ".join(ds.warnings) or None  # patients in both splits
    if unchanged and not old.get("embedding_failed"):
        return _previous_result(out, old, leak)

    enc_obj, thumb_size, failed, warning = None, 0, False, None
    if not embed:
        emb_note = "embedding pass off (--no-embed)"
    else:
        loaded, info = _load_encoder(enc_name)
        if loaded is None:
            failed = True
            emb_note = f"embedding pass skipped: encoder {enc_name!r} could not be loaded ({info})"
            warning = (f"{emb_note}.\n  The colour and hash checks still run. For the embedding pass, pass "
                       "--encoder efficientnet-lite0 (installed weights) or a local model folder; --no-embed turns "
                       "the pass off.")
            if unchanged:  # same inputs, and the encoder still cannot be loaded: nothing new to do
                return _previous_result(out, old, warning)
        else:
            enc_obj, thumb_size = loaded, info
            emb_note = f"thumbnails ({thumb_size} px) through encoder {enc_name}"

    results = _map_images(samples, settings, thumb_size)
    unreadable = [Problem(s.image, r.problem) for s, r in zip(samples, results) if r.problem]
    if strict and unreadable:
        raise UserError(f"{len(unreadable)} unreadable image(s) (--strict): {unreadable[0]}", path=data)
    problems = list(ds.problems) + unreadable
    good = [(s, r) for s, r in zip(samples, results) if r.problem is None]
    if not good:
        raise UserError("no image could be read", path=data,
                        hint="\n  ".join(map(str, problems[:20])) or None)

    # One thumbnail embedding per image, when the pass runs.
    knn_d, knn_z = np.full(len(good), np.nan), np.full(len(good), np.nan)
    similarity = None
    if enc_obj is not None:
        e = _embed_thumbnails(enc_obj, np.stack([r.thumb for _, r in good]))
        if len(good) > settings.knn_k + 1:
            knn_d = knn_distance(e, settings.knn_k)
            knn_z = robust_z(knn_d)
        else:
            emb_note += f" (too few images for k={settings.knn_k} neighbours: outlier score not computed)"
        if len(good) >= 3:
            similarity = centred_cosine(e)

    hashes = np.stack([r.phash for _, r in good])
    split = [s.split for s, _ in good]
    pairs = duplicate_pairs(hashes, similarity, settings)
    within = [(i, j, why) for i, j, why in pairs if split[i] == split[j]]
    groups = duplicate_groups(len(good), within)  # fit keeps a training group in one fold
    partners: dict[int, list[str]] = {}
    for i, j, why in within:
        partners.setdefault(i, []).append(f"{good[j][0].image_id} ({why})")
        partners.setdefault(j, []).append(f"{good[i][0].image_id} ({why})")
    # A test image close to a training image: listed as possible leakage, never dropped.
    dist = hash_distances(hashes)
    near: dict[int, tuple[int, str]] = {}        # test index -> (closest training index, why)
    leaked_to: dict[int, list[str]] = {}         # training index -> names of the test images close to it
    for i, j, why in pairs:
        if split[i] == split[j]:
            continue
        t, tr = (i, j) if split[i] == "test" else (j, i)
        leaked_to.setdefault(tr, []).append(good[t][0].image_id)
        if t not in near or dist[t, tr] < dist[t, near[t][0]]:
            near[t] = (tr, why)
    twins: dict[int, list[int]] = {}
    train_idx = [i for i in range(len(good)) if split[i] == "train"]
    for group in mask_twins([good[i][1].mask_sha256 for i in train_idx]):
        for a in group:
            twins[train_idx[a]] = [train_idx[b] for b in group if b != a]

    rows = []
    for idx, (s, r) in enumerate(good):
        non_tissue, ink, blank, reasons = colour_flags(r.scores, settings)
        twin_names = [good[t][0].image_id for t in twins.get(idx, [])]
        if twin_names:
            shared = ", ".join(twin_names)
            if non_tissue:
                reasons[0] += f"; its mask file is byte-identical to that of {shared} (a paste reusing that mask)"
            else:
                reasons.append(f"mask twin: the mask file is byte-identical to that of {shared}")
        outlier = None
        if not np.isnan(knn_z[idx]):
            outlier = bool(knn_z[idx] > settings.outlier_z)
            if outlier:
                reasons.append(f"outlier: embedding kNN distance z = {knn_z[idx]:.1f} "
                               f"(limit {settings.outlier_z:g})")
        flagged = non_tissue or ink or blank or bool(outlier)
        if groups[idx] is not None:
            reasons.append(f"near-duplicate group {groups[idx]}: "
                           + "; ".join(partners.get(idx, [])[:5]))
        near_name, near_dist, near_cos = None, None, None
        if idx in near:
            tr, why = near[idx]
            near_name, near_dist = good[tr][0].image_id, int(dist[idx, tr])
            near_cos = float(similarity[idx, tr]) if similarity is not None else None
            reasons.append(f"possible leakage: near-duplicate of training image {near_name} ({why})")
        if idx in leaked_to:
            names = leaked_to[idx]
            reasons.append(f"test image(s) {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} "
                           "nearly duplicate this training image")
        if s.split == "train" and s.image_id in keep and flagged:
            flagged = False
            reasons.append("kept (--keep)")
        rows.append({
            "image_id": s.image_id, "split": s.split, "flagged": flagged,
            "non_tissue": non_tissue, "ink": ink, "blank": blank, "outlier": outlier,
            "duplicate_group": groups[idx], "mask_twin": twin_names or None,
            "near_train": near_name, "near_train_hash_distance": near_dist, "near_train_cosine": near_cos,
            "reason": "; ".join(reasons),
            **r.scores, "knn_distance": knn_d[idx], "knn_z": knn_z[idx],
        })
    table = _qc_table(rows)
    meta = {"key": key, "settings": settings.model_dump(), "embedding": emb_note, "embedding_failed": failed,
            "problems": [[str(p.path), p.problem] for p in problems], "keep": list(keep),
            "content_stamps": stamp.used, SAMPLE_STAMPS: checked}
    store.write_table(table, out, meta)
    warning = "; ".join(w for w in (warning, leak) if w) or None
    return QCResult(out, table, skipped=False, problems=problems, embedding=emb_note, warning=warning)
