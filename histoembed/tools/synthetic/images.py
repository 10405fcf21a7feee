"""The image dataset in the reference challenge's layout: tissue images, tumour masks, labels, planted outliers.

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

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from histoembed.core import cpus
from histoembed.engines.local import map_ordered
from histoembed.tools.synthetic.render import (
    LABELS,
    STAIN_GROUPS,
    add_ink,
    cartoon_image,
    near_copy,
    shifted_stains,
    stain_groups,
)
from histoembed.tools.synthetic.signals import signal_image

# Class balance of the reference training set (691 images).
REFERENCE_COUNTS = {"HER2(+)": 189, "Luminal A": 205, "Luminal B": 220, "Triple negative": 77}
PLANTED_FILE = "planted.json"


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


@dataclass(frozen=True)
class _Plan:
    """What the seed decides before any pixel is drawn: every image's label and the planted cases."""

    seed: int
    train_labels: list[str]
    test_labels: list[str]              # drawn with the reference balance, never written (as in the challenge)
    counts: dict[str, int]
    planted: dict[str, str]             # {training name: non_tissue | ink | blank}
    twins: list[tuple[int, int]]        # (cartoon, tissue image whose mask it reuses), training indices
    near: list[tuple[int, int]]         # (test index, training index it copies)


def _plan(n_train: int, n_test: int, seed: int, outliers: bool, mask_twins: int, near_duplicates: int) -> _Plan:
    """Labels and planted cases, drawn from ``seed`` in a fixed order (the files depend on it)."""
    n_cartoons = max(1, mask_twins) if outliers else 0
    n_near = min(near_duplicates, n_test) if outliers else 0
    if outliers and n_train < min_train(n_cartoons, n_near):
        raise ValueError(f"planting outliers needs n_train >= {min_train(n_cartoons, n_near)}")
    rng = np.random.default_rng(seed)
    counts = class_counts(n_train)
    train_labels = [k for k in LABELS for _ in range(counts[k])]
    rng.shuffle(train_labels)
    test_labels = [str(v) for v in rng.choice(LABELS, size=n_test, p=[REFERENCE_COUNTS[k] / 691 for k in LABELS])]
    planted: dict[str, str] = {}
    twins: list[tuple[int, int]] = []
    near: list[tuple[int, int]] = []
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
    return _Plan(seed, train_labels, test_labels, counts, planted, twins, near)


def _tissue_jobs(out: Path, plan: _Plan, groups: list[str], stain_shift: float, sizes: tuple,
                 class_signal: str, partial_masks: bool) -> list[_TissueJob]:
    """Every image drawn as tissue: training images but the cartoons, test images but the copies."""
    stains = {g: shifted_stains(g, stain_shift) for g in STAIN_GROUPS}
    cartoons, copies = dict(plan.twins), dict(plan.near)
    n_train, seed = len(plan.train_labels), plan.seed
    train_dir, test_dir = out / "train_data", out / "test_data"
    jobs = [_TissueJob(train_dir / f"img_{i:04d}.png", train_dir / f"mask_{i:04d}.png", (seed, i),
                       plan.train_labels[i], stains[groups[i]], *sizes, class_signal, partial_masks,
                       empty_mask=plan.planted.get(f"img_{i:04d}.png") == "blank",
                       ink=plan.planted.get(f"img_{i:04d}.png") == "ink")
            for i in range(n_train) if i not in cartoons]
    jobs += [_TissueJob(test_dir / f"img_{j:04d}.png", test_dir / f"mask_{j:04d}.png", (seed, n_train + j),
                        plan.test_labels[j], stains["test"], *sizes, class_signal, partial_masks)
             for j in range(len(plan.test_labels)) if j not in copies]
    return jobs


def _paste_copies(out: Path, plan: _Plan) -> None:
    """Cartoons at their source's size over its mask file, and test images that copy a training image."""
    train_dir, test_dir = out / "train_data", out / "test_data"
    n_train, seed = len(plan.train_labels), plan.seed
    for i, src in sorted(plan.twins):
        h, w = cv2.imread(str(train_dir / f"img_{src:04d}.png"), cv2.IMREAD_UNCHANGED).shape[:2]
        _write_png(train_dir / f"img_{i:04d}.png", cartoon_image(np.random.default_rng([seed, i]), w, h))
        shutil.copyfile(train_dir / f"mask_{src:04d}.png", train_dir / f"mask_{i:04d}.png")
    for j, src in sorted(plan.near):
        source = cv2.cvtColor(cv2.imread(str(train_dir / f"img_{src:04d}.png"), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        _write_png(test_dir / f"img_{j:04d}.png", near_copy(source, np.random.default_rng([seed, n_train + j])))
        shutil.copyfile(train_dir / f"mask_{src:04d}.png", test_dir / f"mask_{j:04d}.png")


def _write_records(out: Path, plan: _Plan, groups: list[str], stain_shift: float, class_signal: str,
                   partial_masks: bool) -> dict:
    """train_labels.csv and planted.json; returns make_dataset's summary."""
    n_train, n_test = len(plan.train_labels), len(plan.test_labels)
    labels = dict(sorted((f"img_{i:04d}.png", plan.train_labels[i]) for i in range(n_train)))
    lines = ["sample_index,label"] + [f"{k},{v}" for k, v in labels.items()]
    (out / "train_labels.csv").write_text("\n".join(lines) + "\n")
    planted = dict(sorted(plan.planted.items()))
    mask_pairs = [[f"img_{c:04d}.png", f"img_{src:04d}.png"] for c, src in sorted(plan.twins)]
    near_pairs = [[f"img_{j:04d}.png", f"img_{src:04d}.png"] for j, src in sorted(plan.near)]
    shift = None
    if stain_shift:
        cartoons, copies = dict(plan.twins), {j: f"img_{src:04d}.png" for j, src in plan.near}
        shift = {"strength": stain_shift,
                 "train": {f"img_{i:04d}.png": ("cartoon" if i in cartoons else groups[i]) for i in range(n_train)},
                 "test": {f"img_{j:04d}.png": (f"copy of train {copies[j]}" if j in copies else "test")
                          for j in range(n_test)}}
    crop_problems = {"class_signal": class_signal, "partial_masks": partial_masks}
    planted_crops = crop_problems if class_signal != "morphology" or partial_masks else {}  # listed when planted
    (out / PLANTED_FILE).write_text(json.dumps(
        {"flags": planted, "mask_twins": mask_pairs, "near_duplicates": near_pairs,
         **({"stain_shift": shift} if shift else {}), **planted_crops}, indent=2) + "\n")
    return {"train": list(labels), "test": [f"img_{j:04d}.png" for j in range(n_test)], "labels": labels,
            "counts": plan.counts, "planted": planted, "mask_twins": mask_pairs, "near_duplicates": near_pairs,
            "seed": plan.seed, "stain_shift": shift, **crop_problems}


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
    plan = _plan(n_train, n_test, seed, outliers, mask_twins, near_duplicates)
    for split in ("train", "test"):
        (out / f"{split}_data").mkdir(parents=True, exist_ok=True)
    groups = stain_groups(plan.train_labels, seed) if stain_shift else ["train-a"] * n_train
    # Tissue images first, in worker processes (each image draws from its own generator, so the files
    # do not depend on the order or the number of processes); then cartoons, which take their
    # source's size and mask file, and test copies of training images.
    jobs = _tissue_jobs(out, plan, groups, stain_shift, (reference_size_scale, size_range), class_signal,
                        partial_masks)
    with map_ordered(_draw_tissue, jobs, cpus.usable_cpus() if len(jobs) >= 64 else 1) as drawn:
        for _ in drawn:
            pass
    _paste_copies(out, plan)
    return _write_records(out, plan, groups, stain_shift, class_signal, partial_masks)


def reference_scale(out: Path, seed: int = 0, size_scale: float = 1.0, near_duplicates: int = 10) -> dict:
    """The reference challenge's layout at full size: 691 training images (HER2(+) 189, Luminal A 205,
    Luminal B 220, Triple negative 77), 477 test images, sizes spread like the real ones (times
    ``size_scale``), 60 cartoons pasted over other images' masks, an ink smear, an empty mask and
    ``near_duplicates`` test images copying training images."""
    return make_dataset(out, REFERENCE_TRAIN, REFERENCE_TEST, seed, outliers=True,
                        mask_twins=REFERENCE_MASK_TWINS, near_duplicates=near_duplicates,
                        reference_size_scale=size_scale)
