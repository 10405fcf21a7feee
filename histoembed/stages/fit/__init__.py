"""The fit stage: cross-validated heads (``--heads``, default MLP + XGBoost), calibration,
fusion, class offsets and conformal sets.

The recipe (``run_fit``), one module per step:

- ``training``: the training images after QC, their labels and fold groups (patients, duplicates);
- ``folds``: stratified, grouped, seeded folds and the inner (fit, stopping) split;
- ``cv``: the fold loop (every head on every fold: out-of-fold logits), once per seed;
- ``task``: what the loop fits for (classification): the cross-fitted decisions (temperatures,
  fusion weights, class offsets, conformal thresholds chosen on the other folds' OOF logits, so
  no reported prediction helped choose its own parameters) and the numbers of metrics.json;
- ``outputs``: ``models/``, ``calibration.json``, ``oof.parquet`` and ``metrics.json``, written
  atomically and keyed (a re-run with the same inputs and settings does nothing), the fit lock,
  and the recovery of what a killed fit left;
- ``outcomes``, ``outcome_tasks``: survival and regression (``--task``): the outcomes read from the data, the
  strata the folds balance, the cross-fitted fusion of risks or predictions and their numbers;
- ``multi``: several encoders (``--encoder A,B``), the same steps over each encoder's store.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path

import numpy as np

from histoembed.core import cpus, feature_store, memory
from histoembed.core.config import FitSettings
from histoembed.core.errors import UserError
from histoembed.models.heads import Bags, check_names
from histoembed.models.heads import get as get_head
from histoembed.models.heads.objectives import Objective, check_task
from histoembed.stages.fit import engines, streaming
from histoembed.stages.fit.cv import CVResult, cross_validate, fit_heads, run_cv, seeds_of
from histoembed.stages.fit.folds import _group_kfold, derived_seed, inner_split, make_folds
from histoembed.stages.fit.multi import EncoderPart, run_fit_multi
from histoembed.stages.fit.outputs import (FIT_LOCK, FitResult, encoder_name, fit_key, fit_lock, fit_metrics,
                                           recover, up_to_date, write_outputs)
from histoembed.stages.fit.outcome_tasks import OutcomeTask
from histoembed.stages.fit.outcomes import TaskChoice, choose_task, load_outcome_set
from histoembed.stages.fit.task import Classification, classification, cv_metrics
from histoembed.stages.fit.training import (TrainingSet, check_class_counts, load_training_set, patient_groups,
                                            qc_flags, qc_mismatch, read_labels)

__all__ = ["CVResult", "Classification", "EncoderPart", "FIT_LOCK", "FitResult", "TrainingSet", "_group_kfold",
           "check_class_counts", "cross_validate", "cv_metrics", "derived_seed", "fit_heads", "inner_split",
           "load_training_set", "make_folds", "parse_encoders", "patient_groups", "qc_flags", "qc_mismatch",
           "read_labels", "run_cv", "run_fit", "run_fit_multi"]


def run_fit(run: Path, settings: FitSettings, encoder: str | None = None) -> FitResult:
    """Fit, evaluate and save the heads with ``settings.folds``-fold cross-validation."""
    started = time.perf_counter()
    run = Path(run)
    check_names(settings.heads)
    cpus.use_threads(settings.threads)
    memory.return_large_blocks()   # a long fit's freed bags go back to the system (issue 37)
    encoders = parse_encoders(encoder if encoder is not None else settings.encoder)
    choice = choose_task(run, settings)
    if choice.task != "classification":
        return run_outcome_fit(run, settings, encoders, choice, started)
    if len(encoders) > 1:
        return run_fit_multi(run, settings, encoders, started)
    name = encoders[0] if encoders else None
    ts, streamed = streaming.load(run, name, settings)
    check_class_counts(run, ts, settings)
    task = classification(ts, settings)   # a wrong class_order is said before any fitting
    key = fit_key(ts, settings)
    with fit_lock(run):
        recover(run)
        done = up_to_date(run, key)
        if done is not None:
            return FitResult.of(run, ts, done, started, skipped=True)
        bags = streamed.bags() if streamed else take_bags(ts)
        with engines.session(settings):
            results = cross_validate(bags, ts.y, ts.groups, settings, task,
                                     engines.runner_for(run, name, settings, ts.image_ids, ts.classes))
        cv = results[0][0]
        metrics = fit_metrics(key, encoder_name(ts), ts, settings, cv.heads, {}, "head", results, seeds_of(settings))
        write_outputs(run, ts, settings, cv, metrics, key)
    return FitResult.of(run, ts, metrics, started)


def run_outcome_fit(run: Path, settings: FitSettings, encoders: list[str], choice: TaskChoice,
                    started: float) -> FitResult:
    """Survival or regression: the same recipe with ``outcome_tasks.OutcomeTask`` in the fold loop."""
    if len(encoders) > 1:
        raise UserError(f"{choice.task} fits one encoder's features at a time", hint="pass one --encoder")
    if settings.engine != "local":
        raise UserError(f"{choice.task} fits run in this process", hint="leave out --engine ray (classification's)")
    objective = Objective(choice.task, settings.regression_loss)
    for name in settings.heads:
        check_task(get_head(name), objective)
    ts, y, outcomes, streamed = load_outcome_set(run, settings, encoders[0] if encoders else None, choice.task)
    key = fit_key(ts, settings)
    with fit_lock(run):
        recover(run)
        done = up_to_date(run, key)
        if done is not None:
            return FitResult.of(run, ts, done, started, skipped=True)
        bags = streamed.bags() if streamed else take_bags(ts)
        task = OutcomeTask(choice.task, ts.y, ts.bootstrap_units(), objective, settings.alpha, settings.weight_grid)
        results = cross_validate(bags, y, ts.groups, settings, task)
        cv = results[0][0]
        metrics = fit_metrics(key, encoder_name(ts), ts, settings, cv.heads, {}, "head", results, seeds_of(settings))
        metrics.update(task_from=choice.why, outcome_columns=outcomes.columns, outcome_file=str(outcomes.path),
                       skipped_rows=outcomes.skipped)
        if choice.task == "survival":
            metrics["events"] = int(ts.outcomes[:, 1].sum())
        write_outputs(run, ts, settings, cv, metrics, key)
    return FitResult.of(run, ts, metrics, started)


def parse_encoders(value: str | None) -> list[str]:
    """Encoder names of ``--encoder A,B`` (or ``encoder = "A,B"``); [] when none is given."""
    return feature_store.encoder_list(value) if value is not None else []


def take_bags(ts: TrainingSet) -> Bags:
    """The training rows as bags; the store's copy is let go (an empty array keeps the width for the manifest)."""
    bags = Bags.from_rows(ts.features.embedding, ts.row_image, ts.features.view)
    ts.features = dataclasses.replace(ts.features, embedding=np.zeros((0, bags.dim), np.float32))
    gc.collect()
    return bags
