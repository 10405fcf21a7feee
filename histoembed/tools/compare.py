"""Compare two runs over the same training images: is the change in a metric real or noise?

Both runs' out-of-fold predictions are scored on the same images. The difference of the chosen
metric (``--metric``: macro-F1 by default, AUROC, average precision, balanced accuracy, quadratic
kappa or NLL; B minus A) gets a paired bootstrap interval: each resample draws **patients** (the
manifest's ``group``, from ``oof.parquet`` or the run's crops table) with replacement, or images
when there are no patients, and scores *both* runs on that same draw, so the variation both runs
share cancels out and only the difference between the runs is left. The per-fold values are
computed on RUN_A's folds (the same images for both runs).

AUROC, average precision and NLL read the fused out-of-fold probabilities; macro-F1, balanced
accuracy and kappa read the decided class (``--decision``: the argmax or the class offsets).
Kappa needs the order of the classes: RUN_A's (``fit`` records it) or ``class_order``.

Runs over different training images (another QC, other labels) cannot be compared this way:
``run_compare`` refuses them and says which images differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.maths import metrics
from histoembed.maths.resample import paired_bootstrap
from histoembed.stages.fit import patient_groups

DECISIONS = {"argmax": "prediction", "offsets": "prediction_offsets"}
METRICS = ("macro_f1", "auroc", "average_precision", "balanced_accuracy", "kappa", "nll")
LABELS = {"macro_f1": "macro-F1", "auroc": "AUROC", "average_precision": "average precision",
          "balanced_accuracy": "balanced accuracy", "kappa": "quadratic weighted kappa", "nll": "NLL"}


@dataclass
class RunPredictions:
    run: Path
    image_ids: list[str]
    labels: list[str]
    fold: np.ndarray
    pred: list[str]
    classes: list[str]
    prob: np.ndarray | None = None     # fused calibrated out-of-fold probabilities [N, C]
    groups: list | None = None         # patient per image, None without patients


@dataclass
class CompareResult:
    a: Path
    b: Path
    images: int
    classes: list[str]
    value_a: float
    value_b: float
    difference: float              # b - a
    interval: tuple[float, float]  # paired bootstrap, 95 %
    folds: list[dict]              # per fold of RUN_A: images, the metric of a and b, difference
    same_folds: bool
    decision: str
    bootstrap: int
    metric: str = "macro_f1"
    unit: str = "images"           # what the bootstrap drew: "patients" or "images"
    patients: int | None = None

    @property
    def lower_is_better(self) -> bool:
        return self.metric in metrics.LOWER_IS_BETTER

    def as_dict(self) -> dict:
        clean = lambda v: None if v is None or not math.isfinite(v) else float(v)  # noqa: E731
        return {"run_a": str(self.a), "run_b": str(self.b), "images": self.images, "patients": self.patients,
                "classes": self.classes, "metric": self.metric, "lower_is_better": self.lower_is_better,
                "decision": self.decision if self.metric in metrics.DECISION_METRICS else None,
                "value_a": clean(self.value_a), "value_b": clean(self.value_b),
                f"{self.metric}_a": clean(self.value_a), f"{self.metric}_b": clean(self.value_b),
                "difference_b_minus_a": clean(self.difference), "interval_95": [clean(v) for v in self.interval],
                "resampled": self.unit, "bootstrap": self.bootstrap, "same_folds": self.same_folds,
                "folds_of_run_a": [{k: clean(v) if isinstance(v, float) else v for k, v in f.items()}
                                   for f in self.folds]}


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
    ids = [str(i) for i in table["image_id"].to_pylist()]
    prob = store.embedding_matrix(table["prob"]).astype(np.float64) if "prob" in table.column_names else None
    return RunPredictions(Path(run), ids, labels, table["fold"].to_numpy().astype(np.int64),
                          table[column].to_pylist(), classes, prob, _patients(Path(run), table, ids))


def _patients(run: Path, table, ids: list[str]) -> list | None:
    """Each image's patient: oof.parquet's ``group`` column, else the run's crops table's; None without one."""
    groups = table["group"].to_pylist() if "group" in table.column_names else []
    if not any(g not in (None, "") for g in groups):   # an older fit's table: the crops table's groups
        try:
            by_key = patient_groups(run) if (run / store.CROPS_FILE).exists() else {}
        except (OSError, ValueError):
            by_key = {}
        groups = [by_key.get(f"train/{i}") for i in ids]
    if not any(g not in (None, "") for g in groups):
        return None
    # an image without a patient is its own patient
    return [g if g not in (None, "") else f"\0image:{i}" for g, i in zip(groups, ids)]


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


def class_order(run: Path, classes: list[str], given: list[str] | None) -> np.ndarray:
    """Grades of the classes for kappa: ``given``, else the order RUN_A's ``fit`` recorded in metrics.json."""
    order = given
    if order is None and (Path(run) / store.METRICS_FILE).exists():
        order = store.read_json(Path(run) / store.METRICS_FILE).get("class_order")
    if order is None:
        raise UserError("kappa needs the order of the classes, and RUN_A's fit recorded none",
                        path=Path(run) / store.METRICS_FILE,
                        hint="fit with `class_order` in [fit] of histoembed.toml (or --ordinal), or pass "
                             f"--class-order {','.join(classes)} in grade order")
    try:
        return metrics.class_ranks(classes, list(order))
    except ValueError as e:
        raise UserError(str(e), hint=f"list each of {', '.join(classes)} once, lowest grade first") from None


def _metric(name: str, C: int, ranks: np.ndarray | None):
    """(function of (y, values), whether it reads the probabilities)."""
    if name in metrics.DECISION_METRICS:
        return metrics.decision_score(name, C, ranks), False
    return metrics.scorer(name, C), True


def _values(p: RunPredictions, index: dict, probabilities: bool) -> np.ndarray:
    if not probabilities:
        return np.array([index[c] for c in p.pred])
    if p.prob is None:
        raise UserError("the out-of-fold table has no probabilities (column prob)", path=p.run / store.OOF_FILE,
                        hint="re-run `histoembed fit` with this version")
    return p.prob


def run_compare(run_a: Path, run_b: Path, bootstrap: int = 2000, seed: int = 0, decision: str = "argmax",
                metric: str = "macro_f1", order: list[str] | None = None) -> CompareResult:
    """Paired comparison of two runs' out-of-fold ``metric`` (see the module docstring)."""
    if decision not in DECISIONS:
        raise UserError(f"unknown decision {decision!r}", hint="choose argmax or offsets")
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}", hint=f"choose one of {', '.join(METRICS)}")
    a, b = read_predictions(run_a, decision), read_predictions(run_b, decision)
    _same_images(a, b)
    index = {c: k for k, c in enumerate(a.classes)}
    C = len(a.classes)
    ranks = class_order(run_a, a.classes, order) if metric == "kappa" else None
    score, probabilities = _metric(metric, C, ranks)
    order_b = np.array([{i: n for n, i in enumerate(b.image_ids)}[i] for i in a.image_ids])
    y = np.array([index[label] for label in a.labels])
    va, vb = _values(a, index, probabilities), _values(b, index, probabilities)[order_b]
    d = paired_bootstrap(score, (y, va), (y, vb), groups=a.groups, n=bootstrap, seed=seed)
    folds = []
    for k in np.unique(a.fold):
        rows = a.fold == k
        fa, fb = float(score(y[rows], va[rows])), float(score(y[rows], vb[rows]))
        folds.append({"fold": int(k), "images": int(rows.sum()), "a": fa, "b": fb, "difference": fb - fa})
    return CompareResult(Path(run_a), Path(run_b), len(y), a.classes, float(score(y, va)), float(score(y, vb)),
                         d.value, (d.lo, d.hi), folds, bool(np.array_equal(a.fold, b.fold[order_b])), decision,
                         bootstrap, metric, d.unit, None if a.groups is None else len(set(a.groups)))
