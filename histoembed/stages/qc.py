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

The scores themselves are pure maths below the stages: colour scores, flags and thumbnails in
``maths/image_scores.py``, hashes, kNN outliers and duplicate groups in ``maths/duplicates.py``. This module reads
the images in worker processes, runs the embedding pass, and writes what they find.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from histoembed.core import store
from histoembed.core.config import QCSettings
from histoembed.core.console import noun, progress
from histoembed.core.errors import UserError
from histoembed.inputs.samples import check_keep
from histoembed.inputs.dataset import (
    MAX_PIXELS,
    Dataset,
    Problem,
    Sample,
    load_dataset,
    read_image_and_mask,
    read_slide_thumbnail,
)
from histoembed.inputs.pixels import tissue_mask_by_colour
from histoembed.inputs.provenance import SAMPLE_STAMPS, checked_stamps
from histoembed.maths.duplicates import (
    centred_cosine,
    duplicate_groups,
    duplicate_pairs,
    hash_distances,
    knn_distance,
    mask_twins,
    perceptual_hash,
    robust_z,
)
from histoembed.maths.image_scores import colour_flags, colour_scores, downscale, thumbnail, tissue_box

QC_VERSION = 2          # bump when a score's definition changes (part of the skip key)

SCORE_COLUMNS = ("green_fraction", "brown_fraction", "yellow_fraction", "blue_fraction",
                 "off_palette_fraction", "he_share", "dark_fraction", "flat_fraction",
                 "ink_fraction", "tissue_fraction", "mask_fraction", "tissue_in_mask",
                 "knn_distance", "knn_z")


# ---------------------------------------------------------------- per-image work (the colour pass)

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
    slides = sum(s.slide for s in samples)
    with progress(noun(len(samples) - slides, slides, number="s")) as bar:
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
    slide_keys: frozenset[str] = frozenset()        # split/image_id of every whole slide in the data

    def kinds(self) -> tuple[int, int]:
        """(flat images, whole slides) among the table's rows: the console counts each in its own words."""
        t = self.table.to_pydict()
        slides = sum(f"{sp}/{i}" in self.slide_keys for i, sp in zip(t["image_id"], t["split"]))
        return self.table.num_rows - slides, slides

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


def _previous_result(out: Path, meta: dict, warning: str | None, slide_keys: frozenset[str]) -> QCResult:
    problems = [Problem(Path(p), why) for p, why in meta.get("problems", [])]
    return QCResult(out, store.read_qc(out.parent), skipped=True, problems=problems,
                    embedding=meta.get("embedding", ""), warning=warning, slide_keys=slide_keys)



@dataclass
class _EmbeddingPass:
    encoder: object = None      # the loaded encoder, None when the pass does not run
    thumb_size: int = 0         # the encoder's input size (0: no thumbnails)
    failed: bool = False        # asked for, but the encoder could not be loaded
    note: str = ""              # where embeddings came from, or why there were none
    warning: str | None = None  # what the user can do when the encoder could not be loaded


def _embedding_pass(embed: bool, enc_name: str | None) -> _EmbeddingPass:
    """The encoder of the embedding pass, or why there is none."""
    if not embed:
        return _EmbeddingPass(note="embedding pass off (--no-embed)")
    loaded, info = _load_encoder(enc_name)
    if loaded is None:
        note = f"embedding pass skipped: encoder {enc_name!r} could not be loaded ({info})"
        warning = (f"{note}.\n  The colour and hash checks still run. For the embedding pass, pass "
                   "--encoder efficientnet-lite0 (installed weights) or a local model folder; --no-embed turns "
                   "the pass off.")
        return _EmbeddingPass(failed=True, note=note, warning=warning)
    return _EmbeddingPass(loaded, info, note=f"thumbnails ({info} px) through encoder {enc_name}")


def _colour_pass(ds: Dataset, settings: QCSettings, thumb_size: int, strict: bool,
                 data: Path) -> tuple[list[tuple[Sample, _ImageResult]], list[Problem]]:
    """(readable samples with their results, every problem): stops when none could be read, or at one with
    ``strict``."""
    results = _map_images(ds.samples, settings, thumb_size)
    unreadable = [Problem(s.image, r.problem) for s, r in zip(ds.samples, results) if r.problem]
    if strict and unreadable:
        raise UserError(f"{len(unreadable)} unreadable image(s) (--strict): {unreadable[0]}", path=data)
    problems = list(ds.problems) + unreadable
    good = [(s, r) for s, r in zip(ds.samples, results) if r.problem is None]
    if not good:
        raise UserError("no image could be read", path=data,
                        hint="\n  ".join(map(str, problems[:20])) or None)
    return good, problems


@dataclass
class _Neighbours:
    """How the readable images relate to each other, by index into them."""
    knn_d: np.ndarray                  # mean cosine distance to the k nearest (nan without the embedding pass)
    knn_z: np.ndarray                  # the same as a robust z-score
    similarity: np.ndarray | None      # centred cosine of the embeddings, None without them
    dist: np.ndarray                   # hash distances
    groups: list[int | None]           # near-duplicate group within a split
    partners: dict[int, list[str]]     # index -> "name (why)" of its near-duplicates in its split
    near: dict[int, tuple[int, str]]   # test index -> (closest training index, why)
    leaked_to: dict[int, list[str]]    # training index -> names of the test images close to it
    twins: dict[int, list[int]]        # training index -> training indices with a byte-identical mask


def _embedding_scores(emb: _EmbeddingPass, good: list[tuple[Sample, _ImageResult]],
                      settings: QCSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(kNN distance, its robust z, centred cosine) from one thumbnail embedding per image, when the pass
    runs; notes in ``emb.note`` when there are too few images for the outlier score."""
    knn_d, knn_z = np.full(len(good), np.nan), np.full(len(good), np.nan)
    similarity = None
    if emb.encoder is not None:
        e = _embed_thumbnails(emb.encoder, np.stack([r.thumb for _, r in good]))
        if len(good) > settings.knn_k + 1:
            knn_d = knn_distance(e, settings.knn_k)
            knn_z = robust_z(knn_d)
        else:
            emb.note += f" (too few images for k={settings.knn_k} neighbours: outlier score not computed)"
        if len(good) >= 3:
            similarity = centred_cosine(e)
    return knn_d, knn_z, similarity


def _neighbours(emb: _EmbeddingPass, good: list[tuple[Sample, _ImageResult]],
                settings: QCSettings) -> _Neighbours:
    """Outlier scores, near-duplicate groups within a split, test images close to training images, and
    training images whose mask files are byte-identical."""
    knn_d, knn_z, similarity = _embedding_scores(emb, good, settings)
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
    near: dict[int, tuple[int, str]] = {}
    leaked_to: dict[int, list[str]] = {}
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
    return _Neighbours(knn_d, knn_z, similarity, dist, groups, partners, near, leaked_to, twins)


def _row(idx: int, good: list[tuple[Sample, _ImageResult]], nb: _Neighbours, settings: QCSettings,
         keep: Sequence[str]) -> dict:
    """One image's row of qc.parquet: its flags, the reasons behind them, and its scores."""
    s, r = good[idx]
    non_tissue, ink, blank, reasons = colour_flags(r.scores, settings)
    twin_names = [good[t][0].image_id for t in nb.twins.get(idx, [])]
    if twin_names:
        shared = ", ".join(twin_names)
        if non_tissue:
            reasons[0] += f"; its mask file is byte-identical to that of {shared} (a paste reusing that mask)"
        else:
            reasons.append(f"mask twin: the mask file is byte-identical to that of {shared}")
    outlier = None
    if not np.isnan(nb.knn_z[idx]):
        outlier = bool(nb.knn_z[idx] > settings.outlier_z)
        if outlier:
            reasons.append(f"outlier: embedding kNN distance z = {nb.knn_z[idx]:.1f} "
                           f"(limit {settings.outlier_z:g})")
    if ink and s.slide:   # issue 31: a slide's pen ink is kept off its tissue and its patches flagged by crops
        reasons = [r + " (a slide: crops keeps the ink off its tissue; not left out)" if r.startswith("ink") else r
                   for r in reasons]
    flagged = non_tissue or (ink and not s.slide) or blank or bool(outlier)
    if nb.groups[idx] is not None:
        reasons.append(f"near-duplicate group {nb.groups[idx]}: " + "; ".join(nb.partners.get(idx, [])[:5]))
    near_name, near_dist, near_cos = None, None, None
    if idx in nb.near:
        tr, why = nb.near[idx]
        near_name, near_dist = good[tr][0].image_id, int(nb.dist[idx, tr])
        near_cos = float(nb.similarity[idx, tr]) if nb.similarity is not None else None
        reasons.append(f"possible leakage: near-duplicate of training image {near_name} ({why})")
    if idx in nb.leaked_to:
        names = nb.leaked_to[idx]
        reasons.append(f"test image(s) {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} "
                       "nearly duplicate this training image")
    if s.split == "train" and s.image_id in keep and flagged:
        flagged = False
        reasons.append("kept (--keep)")
    return {
        "image_id": s.image_id, "split": s.split, "flagged": flagged,
        "non_tissue": non_tissue, "ink": ink, "blank": blank, "outlier": outlier,
        "duplicate_group": nb.groups[idx], "mask_twin": twin_names or None,
        "near_train": near_name, "near_train_hash_distance": near_dist, "near_train_cosine": near_cos,
        "reason": "; ".join(reasons),
        **r.scores, "knn_distance": nb.knn_d[idx], "knn_z": nb.knn_z[idx],
    }


def run_qc(data: Path, run: Path, settings: QCSettings, embed: bool = True, encoder: str | None = None,
           keep: Sequence[str] = (), strict: bool = False, max_pixels: int = MAX_PIXELS) -> QCResult:
    """Check every image of ``data`` and write ``run/qc.parquet`` (skipped when unchanged)."""
    data, run = Path(data), Path(run)
    out = run / store.QC_FILE
    store.remove_stale(run, ".*.tmp-*")  # what killed runs left
    ds = load_dataset(data, strict=strict, max_pixels=max_pixels)
    check_keep(ds, keep, data)
    slide_keys = frozenset(f"{s.split}/{s.image_id}" for s in ds.samples if s.slide)

    enc_name = (encoder or settings.encoder) if embed else None
    stamp = store.ContentStamps(store.read_meta(out).get("content_stamps") if out.exists() else None)
    checked = checked_stamps(ds.samples, stamp)
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
        return _previous_result(out, old, leak, slide_keys)
    emb = _embedding_pass(embed, enc_name)
    if emb.failed and unchanged:  # same inputs, and the encoder still cannot be loaded: nothing new to do
        return _previous_result(out, old, emb.warning, slide_keys)

    good, problems = _colour_pass(ds, settings, emb.thumb_size, strict, data)
    nb = _neighbours(emb, good, settings)
    table = _qc_table([_row(i, good, nb, settings, keep) for i in range(len(good))])
    meta = {"key": key, "settings": settings.model_dump(), "embedding": emb.note, "embedding_failed": emb.failed,
            "problems": [[str(p.path), p.problem] for p in problems], "keep": list(keep),
            "content_stamps": stamp.used, SAMPLE_STAMPS: checked}
    store.write_table(table, out, meta)
    warning = "; ".join(w for w in (emb.warning, leak) if w) or None
    return QCResult(out, table, skipped=False, problems=problems, embedding=emb.note, warning=warning,
                    slide_keys=slide_keys)
