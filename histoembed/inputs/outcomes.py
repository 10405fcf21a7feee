"""The training items' outcomes for survival and regression (issue 29), read from the data's own listing.

Survival: a ``time`` column (positive, finite, any unit) and an ``event`` column (1: the event was observed,
0: censored at that time); regression: a numeric ``target`` column. The columns sit in the manifest or in
``train_labels.csv`` beside ``sample_index`` (other names with ``--time-column``, ``--event-column``,
``--target-column``). Every bad value is named by its line: the row is skipped and listed, or, with
``strict``, the first one stops the fit.

Outcomes travel from the data to the fit by the fit reading this listing itself (the data folder that
``crops.parquet`` records), not through ``crops.parquet``: an outcome is a number the crops never need, and a
corrected time or target is fitted at once, without cutting the crops again (the fit's key holds every value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histoembed.core.errors import UserError
from histoembed.inputs.layouts import outcome_rows

EVENT_WORDS = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0}


@dataclass
class Outcomes:
    """Each training item's outcome by image id: [time, event] (survival) or [target] (regression)."""

    task: str
    columns: list[str]
    path: Path
    values: dict[str, list[float]]
    skipped: list[str] = field(default_factory=list)   # one line per row left out, naming the row and why


def columns_of(header: list[str], time_column: str, event_column: str, target_column: str) -> str | None:
    """The outcome task the listing's columns give: survival (time and event), regression (target), or None."""
    if time_column in header and event_column in header:
        return "survival"
    if target_column in header:
        return "regression"
    return None


def _number(raw: str | None) -> float | None:
    try:
        return float((raw or "").strip())
    except ValueError:
        return None


def _survival_row(row: dict, time_column: str, event_column: str) -> tuple[list[float] | None, str | None]:
    raw_t, raw_e = (row.get(time_column) or "").strip(), (row.get(event_column) or "").strip()
    if not raw_t:
        return None, f"{time_column} is missing"
    t = _number(raw_t)
    if t is None or not math.isfinite(t):
        return None, f"{time_column} {raw_t!r} is not a finite number"
    if t <= 0:
        return None, f"{time_column} {raw_t} is not positive"
    e = EVENT_WORDS.get(raw_e.lower())
    if e is None:
        return None, f"{event_column} {raw_e!r} is neither 1 (event) nor 0 (censored)" if raw_e else \
            f"{event_column} is missing"
    return [t, float(e)], None


def _target_row(row: dict, target_column: str) -> tuple[list[float] | None, str | None]:
    raw = (row.get(target_column) or "").strip()
    if not raw:
        return None, f"{target_column} is missing"
    y = _number(raw)
    if y is None or not math.isfinite(y):
        return None, f"{target_column} {raw!r} is not a finite number"
    return [y], None


def read_outcomes(data: Path, task: str, time_column: str = "time", event_column: str = "event",
                  target_column: str = "target", strict: bool = False) -> Outcomes:
    """The outcomes of ``task`` (survival or regression) of every training row of the data's listing."""
    path, header, rows = outcome_rows(data)
    columns = [time_column, event_column] if task == "survival" else [target_column]
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserError(f"the {task} task needs the column(s) {', '.join(missing)}; the header is "
                        f"{','.join(header)}", path=path,
                        hint="name the columns with --time-column/--event-column (survival) or --target-column "
                             "(regression), or choose another --task")
    out = Outcomes(task, columns, path, {})
    for lineno, image_id, row in rows:
        value, why = _survival_row(row, *columns) if task == "survival" else _target_row(row, *columns)
        if why is not None:
            if strict:
                raise UserError(f"line {lineno} ({image_id}): {why}", path=path,
                                hint="correct the row, or leave --strict out to skip such rows (they are listed)")
            out.skipped.append(f"line {lineno} ({image_id}): {why}; skipped")
            continue
        out.values[image_id] = value
    return out


def check_events(outcomes: Outcomes, used: np.ndarray) -> None:
    """A survival cohort (the rows ``used`` [n, 2]) needs at least one observed event (and a target
    regression needs two distinct values) to measure anything."""
    if outcomes.task == "survival" and not (used[:, 1] > 0).any():
        raise UserError(f"no training item has an event ({outcomes.columns[1]} = 1): every one is censored, so "
                        "nothing orders the risks", path=outcomes.path,
                        hint=f"check the {outcomes.columns[1]} column (1 = the event was observed)")
    if outcomes.task == "regression" and len(np.unique(used[:, 0])) < 2:
        raise UserError(f"every training item has the same {outcomes.columns[0]}: there is nothing to predict",
                        path=outcomes.path, hint=f"check the {outcomes.columns[0]} column")
