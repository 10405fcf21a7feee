"""Which task a fit is (``--task``), and the training set of the outcome tasks (issue 29).

``auto`` keeps what every run did before: classification when the training images have labels; otherwise the
data's columns decide (time and event: survival; target: regression). Survival and regression read each
training item's outcome from the data's listing (``inputs.outcomes``: why there and not crops.parquet) and
fold on *strata* in place of classes: event or censored (survival), quartile of the target (regression), so
every fold gets its share of events, or of low and high targets, while a patient's items stay in one fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoembed.core import store
from histoembed.core.config import FitSettings
from histoembed.core.errors import UserError
from histoembed.inputs.layouts import outcome_rows
from histoembed.inputs.outcomes import Outcomes, check_events, columns_of, read_outcomes
from histoembed.models.heads.objectives import OUTPUT
from histoembed.stages.fit import streaming
from histoembed.stages.fit.training import TrainingSet, read_labels

REGRESSION_STRATA = 4   # target quantiles the folds are balanced on (fewer with few items)


@dataclass
class TaskChoice:
    task: str
    why: str          # in words, for the console: which setting or columns gave it


def data_of(run: Path) -> Path:
    """The data folder (or manifest) ``run/crops.parquet`` was cut from."""
    path = Path(run) / store.CROPS_FILE
    if not path.exists():
        raise UserError("crops file not found", path=path, hint="run `histoembed crops` first")
    data = store.read_meta(path).get("data")
    if not data or not Path(data).exists():
        raise UserError("the data the crops were cut from is not where crops.parquet says"
                        + (f" ({data})" if data else ""), path=path,
                        hint="re-run `histoembed crops --data DIR` (the fit reads times, events and targets there)")
    return Path(data)


def choose_task(run: Path, settings: FitSettings) -> TaskChoice:
    """The task to fit: ``settings.task``, or with ``auto`` the labels, else the data's columns."""
    if settings.task != "auto":
        return TaskChoice(settings.task, "--task " + settings.task)
    try:
        read_labels(run)
        return TaskChoice("classification", "the training images have labels")
    except UserError:
        pass
    try:
        path, header, _ = outcome_rows(data_of(run))
    except UserError:   # no crops or no data: the classification path says what is missing, as it always did
        return TaskChoice("classification", "no outcome columns")
    task = columns_of(header, settings.time_column, settings.event_column, settings.target_column)
    if task is None:
        return TaskChoice("classification", "no outcome columns")
    cols = [settings.time_column, settings.event_column] if task == "survival" else [settings.target_column]
    return TaskChoice(task, f"no labels; the columns {', '.join(cols)} of {path.name}")


def strata_of(task: str, values: np.ndarray, folds: int) -> np.ndarray:
    """Survival: 1 for an event, 0 censored; regression: the target's quantile bin (as many bins as fit)."""
    if task == "survival":
        return (values[:, 1] > 0).astype(np.int64)
    bins = max(1, min(REGRESSION_STRATA, len(values) // max(1, folds)))
    rank = np.argsort(np.argsort(values[:, 0], kind="stable"), kind="stable")
    return (rank * bins // max(1, len(values))).astype(np.int64)


def load_outcome_set(run: Path, settings: FitSettings, encoder: str | None, task: str
                     ) -> tuple[TrainingSet, np.ndarray, Outcomes, streaming.Streamed | None]:
    """(training set with strata as its ``y`` and the output name as its one class, the outcomes [n, 2] or [n],
    the outcomes read with their skipped rows, the bags to stream when the store is too big for memory)."""
    outcomes = read_outcomes(data_of(run), task, settings.time_column, settings.event_column,
                             settings.target_column, settings.strict)
    keyed = {f"train/{k}": v for k, v in outcomes.values.items()}
    if not keyed:
        raise UserError(f"no training row has a usable {' and '.join(outcomes.columns)}", path=outcomes.path,
                        hint="the rows skipped: " + "; ".join(outcomes.skipped[:3]))
    ts, streamed = streaming.load(run, encoder, settings, labels={k: "outcome" for k in keyed})
    values = np.array([keyed[f"train/{i}"] for i in ts.image_ids], dtype=np.float64)
    check_events(outcomes, values)
    if len(np.unique(ts.groups)) < settings.folds:
        raise UserError(f"{len(np.unique(ts.groups))} training patients (or items) for {settings.folds} folds",
                        path=outcomes.path, hint="use fewer --folds")
    ts.y = strata_of(task, values, settings.folds)
    ts.classes = [OUTPUT[task]]
    ts.outcomes = values
    return ts, values if task == "survival" else values[:, 0], outcomes, streamed
