"""Compare two survival or regression runs over the same training items (issue 29): is the change in the
out-of-fold C-index (survival) or R² (regression) real or noise?

As for classification (``compare``): both runs' fused out-of-fold outputs are scored on the same items, and the
difference (B minus A) gets a paired bootstrap interval (``maths.resample.paired_bootstrap``: each resample
scores both runs on the same draw of patients, or of items without patients); per-fold differences on RUN_A's folds. Runs of different tasks, items or
outcomes are refused, naming what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.maths.regression import r2
from histoembed.maths.resample import paired_bootstrap
from histoembed.maths.survival import harrell_c

METRIC = {"survival": "C-index", "regression": "R²"}


def outcome_task(run: Path) -> str | None:
    """survival or regression when ``run/oof.parquet`` is of one (its ``risk`` or ``target`` column), else None."""
    path = Path(run) / store.OOF_FILE
    if not path.exists():
        return None
    names = set(store.read_table(path, "out-of-fold predictions", stage="fit").column_names)
    return "survival" if {"risk", "time", "event"} <= names else "regression" if "target" in names else None


@dataclass
class OutcomeComparison:
    a: Path
    b: Path
    task: str
    items: int
    score_a: float
    score_b: float
    difference: float              # b - a
    interval: tuple[float, float]  # paired bootstrap, 95 %
    folds: list[dict]
    bootstrap: int

    @property
    def metric(self) -> str:
        return METRIC[self.task]

    def as_dict(self) -> dict:
        return {"run_a": str(self.a), "run_b": str(self.b), "task": self.task, "metric": self.metric,
                "items": self.items, "score_a": self.score_a, "score_b": self.score_b,
                "difference_b_minus_a": self.difference, "interval_95": list(self.interval),
                "bootstrap": self.bootstrap, "folds_of_run_a": self.folds}


def _read(run: Path, task: str):
    table = store.read_table(Path(run) / store.OOF_FILE, "out-of-fold predictions", stage="fit").to_pandas()
    return table.set_index("image_id")


def _score(task: str):
    if task == "survival":
        return lambda t, e, r: harrell_c(t, e, r)
    return lambda y, p: r2(y, p)


def run_compare_outcomes(run_a: Path, run_b: Path, bootstrap: int = 2000, seed: int = 0) -> OutcomeComparison:
    task, other = outcome_task(run_a), outcome_task(run_b)
    if task is None or task != other:
        raise UserError(f"RUN_A is {task or 'classification'}, RUN_B is {other or 'classification'}: only runs of "
                        "one task can be compared", path=Path(run_b) / store.OOF_FILE)
    a, b = _read(run_a, task), _read(run_b, task)
    if set(a.index) != set(b.index):
        only = sorted(set(a.index) ^ set(b.index))
        raise UserError(f"the runs were fitted on different training items ({len(only)} in one only, e.g. "
                        f"{only[0]}), so their scores cannot be paired", path=Path(run_b) / store.OOF_FILE,
                        hint="compare runs with the same crops, outcomes and QC exclusions")
    b = b.loc[a.index]
    outcome = ["time", "event"] if task == "survival" else ["target"]
    if not np.allclose(a[outcome].to_numpy(float), b[outcome].to_numpy(float)):
        raise UserError(f"the training items have different {' / '.join(outcome)} in the two runs",
                        path=Path(run_b) / store.OOF_FILE, hint="compare runs fitted on the same outcomes")
    column = "risk" if task == "survival" else "prediction"
    y = [a[c].to_numpy(float) for c in outcome]
    score = _score(task)
    groups = None   # patients when the data has them (an item without one is its own)
    if "group" in a.columns:
        groups = [g if g else f"\0item:{i}" for g, i in zip(a["group"], a.index)]
    got = paired_bootstrap(score, [*y, a[column].to_numpy(float)], [*y, b[column].to_numpy(float)],
                           groups=groups, n=bootstrap, seed=seed)
    folds = []
    for k in np.unique(a["fold"]):
        rows = (a["fold"] == k).to_numpy()
        fa = score(*(v[rows] for v in y), a[column].to_numpy(float)[rows])
        fb = score(*(v[rows] for v in y), b[column].to_numpy(float)[rows])
        folds.append({"fold": int(k), "items": int(rows.sum()), "score_a": fa, "score_b": fb, "difference": fb - fa})
    sa, sb = score(*y, a[column].to_numpy(float)), score(*y, b[column].to_numpy(float))
    return OutcomeComparison(Path(run_a), Path(run_b), task, len(a), sa, sb, got.value, (got.lo, got.hi), folds,
                             bootstrap)
