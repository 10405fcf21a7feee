"""Compare two runs over the same training images: is the change in macro-F1 real or noise?

Both runs' out-of-fold predictions are scored on the same images. The difference in
macro-F1 (B minus A) gets a paired bootstrap interval: each resample draws images with
replacement and scores *both* runs on that same draw, so the image-to-image variation both
runs share cancels out and only the difference between the runs is left. The per-fold
differences are computed on RUN_A's folds (the same images for both runs).

Runs over different training images (another QC, other labels) cannot be compared this way:
``run_compare`` refuses them and says which images differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.maths.metrics import macro_f1, paired_bootstrap_difference

DECISIONS = {"argmax": "prediction", "offsets": "prediction_offsets"}


@dataclass
class RunPredictions:
    run: Path
    image_ids: list[str]
    labels: list[str]
    fold: np.ndarray
    pred: list[str]
    classes: list[str]


@dataclass
class CompareResult:
    a: Path
    b: Path
    images: int
    classes: list[str]
    macro_f1_a: float
    macro_f1_b: float
    difference: float              # b - a
    interval: tuple[float, float]  # paired bootstrap, 95 %
    folds: list[dict]              # per fold of RUN_A: images, macro-F1 of a and b, difference
    same_folds: bool
    decision: str
    bootstrap: int

    def as_dict(self) -> dict:
        return {"run_a": str(self.a), "run_b": str(self.b), "images": self.images, "classes": self.classes,
                "decision": self.decision, "macro_f1_a": self.macro_f1_a, "macro_f1_b": self.macro_f1_b,
                "difference_b_minus_a": self.difference, "interval_95": list(self.interval),
                "bootstrap": self.bootstrap, "same_folds": self.same_folds, "folds_of_run_a": self.folds}


def read_predictions(run: Path, decision: str) -> RunPredictions:
    path = Path(run) / store.OOF_FILE
    column = DECISIONS[decision]
    table = store.read_table(path, "out-of-fold predictions", hint="run `histoembed fit` in this run first",
                             stage="fit")
    missing = [c for c in ("image_id", "label", "fold", column) if c not in table.column_names]
    if missing:
        raise UserError(f"the out-of-fold table lacks {', '.join(missing)}", path=path,
                        hint="re-run `histoembed fit` with this version")
    labels = table["label"].to_pylist()
    classes = list(store.read_meta(path).get("classes") or sorted(set(labels)))
    return RunPredictions(Path(run), [str(i) for i in table["image_id"].to_pylist()], labels,
                          table["fold"].to_numpy().astype(np.int64), table[column].to_pylist(), classes)


def _same_images(a: RunPredictions, b: RunPredictions) -> None:
    only_a, only_b = sorted(set(a.image_ids) - set(b.image_ids)), sorted(set(b.image_ids) - set(a.image_ids))
    if only_a or only_b:
        examples = ", ".join((only_a + only_b)[:3])
        raise UserError(f"the runs were fitted on different training images ({len(only_a)} only in RUN_A, "
                        f"{len(only_b)} only in RUN_B, e.g. {examples}), so their scores cannot be paired",
                        path=b.run / store.OOF_FILE,
                        hint="compare runs with the same crops, labels and QC exclusions (or --include-flagged in both)")
    if len(set(a.image_ids)) != len(a.image_ids) or len(set(b.image_ids)) != len(b.image_ids):
        raise UserError("an out-of-fold table lists an image twice", path=a.run / store.OOF_FILE,
                        hint="re-run `histoembed fit`")
    label_b = dict(zip(b.image_ids, b.labels))
    differ = [i for i, label in zip(a.image_ids, a.labels) if label_b[i] != label]
    if differ:
        raise UserError(f"{len(differ)} training image(s) have different labels in the two runs (e.g. {differ[0]})",
                        path=b.run / store.OOF_FILE, hint="compare runs made from the same train_labels.csv")
    if a.classes != b.classes:
        raise UserError(f"the runs have different classes ({a.classes} and {b.classes})", path=b.run / store.OOF_FILE)


def run_compare(run_a: Path, run_b: Path, bootstrap: int = 2000, seed: int = 0,
                decision: str = "argmax") -> CompareResult:
    """Paired comparison of two runs' out-of-fold macro-F1 (see the module docstring)."""
    if decision not in DECISIONS:
        raise UserError(f"unknown decision {decision!r}", hint="choose argmax or offsets")
    a, b = read_predictions(run_a, decision), read_predictions(run_b, decision)
    _same_images(a, b)
    index = {c: k for k, c in enumerate(a.classes)}
    row_b = {i: n for n, i in enumerate(b.image_ids)}
    order = np.array([row_b[i] for i in a.image_ids])
    y = np.array([index[label] for label in a.labels])
    pred_a = np.array([index[p] for p in a.pred])
    pred_b = np.array([index[p] for p in b.pred])[order]
    C = len(a.classes)
    diff, lo, hi = paired_bootstrap_difference(y, pred_a, pred_b, C, n=bootstrap, seed=seed)
    folds = []
    for k in np.unique(a.fold):
        rows = a.fold == k
        fa, fb = macro_f1(y[rows], pred_a[rows], C), macro_f1(y[rows], pred_b[rows], C)
        folds.append({"fold": int(k), "images": int(rows.sum()), "macro_f1_a": fa, "macro_f1_b": fb,
                      "difference": fb - fa})
    return CompareResult(Path(run_a), Path(run_b), len(y), a.classes, macro_f1(y, pred_a, C), macro_f1(y, pred_b, C),
                         diff, (lo, hi), folds, bool(np.array_equal(a.fold, b.fold[order])), decision, bootstrap)
