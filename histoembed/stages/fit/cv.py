"""The cross-validation loop: every head on every fold, out-of-fold logits, then the task's decisions.

For each fold k the training folds are split again into a *fit* part and an inner *stopping* part
(stratified, group-aware); every head trains on the fit part and stops early (or picks its
regularisation) on the stopping part, so the evaluation fold never chooses anything. Every head then
predicts the evaluation fold: out-of-fold (OOF) logits per (image, view) and per image.

The loop knows the task only through three things (see ``task.Classification``): how wide a head's
output is, how the heads' OOF outputs become cross-fitted decisions, and what is measured on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from histoembed.core.config import FitSettings
from histoembed.core.console import progress
from histoembed.core.errors import UserError
from histoembed.models.heads import Bags, Head
from histoembed.models.heads import get as get_head
from histoembed.models.heads.objectives import Objective
from histoembed.stages.fit.folds import derived_seed, inner_split, make_folds


@dataclass
class CVResult:
    seed: int
    heads: list[str]              # head names, in fusion order
    fold: np.ndarray              # per image
    z: dict[str, np.ndarray]      # head -> [N, width] float32 OOF image outputs (logits)
    z_bags: dict[str, np.ndarray]  # head -> [bags, width] OOF outputs per (image, view)
    bag_image: np.ndarray         # image of each bag
    fold_params: list[dict]       # per fold: the task's decisions chosen on the other folds
    final: dict                   # the task's decisions chosen on all OOF outputs
    models: list[list[Head]]      # per fold, one fitted head per name
    fold_info: list[dict]         # per fold: images, inner split sizes, what each head fitted


class Task(Protocol):
    """What the fold loop needs of a task (classification; survival and regression: ``outcome_tasks``)."""

    width: int   # outputs per image of every head
    objective: Objective | None   # what the heads are fitted to predict (None: classification)

    def strata(self, y: np.ndarray) -> np.ndarray:
        """What the folds are balanced on, per image: the class, or the event / target quantile."""

    def decide(self, z: dict[str, np.ndarray], y: np.ndarray, fold: np.ndarray) -> tuple[list[dict], dict]:
        """(per-fold parameters chosen on the other folds, final parameters chosen on all rows)."""

    def measure(self, cv: CVResult, y: np.ndarray, settings: FitSettings) -> dict:
        """The cross-validated numbers of metrics.json."""


def run_cv(bags: Bags, y: np.ndarray, groups: np.ndarray, settings: FitSettings, seed: int, task: Task,
           on_fold=lambda k: None, runner=None) -> CVResult:
    """One full cross-validation with ``seed``: folds, heads, OOF outputs, cross-fitted decisions."""
    strata = task.strata(y)
    fold = make_folds(strata, groups, settings.folds, seed)
    z, z_bags, models, info = fit_heads(bags, y, groups, settings, seed, task.width, fold, on_fold,
                                        runner or run_local, strata=strata, objective=task.objective)
    per_fold, final = task.decide(z, y, fold)
    return CVResult(seed, list(settings.heads), fold, z, z_bags, bags.image, per_fold, final, models, info)


def cross_validate(bags: Bags, y: np.ndarray, groups: np.ndarray, settings: FitSettings,
                   task: Task, runner=None) -> list[tuple[CVResult, dict]]:
    """One cross-validation per seed (``settings.seeds`` of them) and its numbers; only the first keeps its models."""
    results: list[tuple[CVResult, dict]] = []
    with progress("folds") as bar:
        for seed in seeds_of(settings):
            bar_task = bar.add_task(f"fit, seed {seed}", total=settings.folds)
            cv = run_cv(bags, y, groups, settings, seed, task, on_fold=lambda k, t=bar_task: bar.advance(t),
                        runner=runner)
            results.append((cv, task.measure(cv, y, settings)))
            if len(results) > 1:
                cv.models = []
    return results


def seeds_of(settings: FitSettings) -> list[int]:
    return [settings.seed + i for i in range(settings.seeds)]


@dataclass
class FoldJob:
    """One head on one fold: what it trains on, stops on and predicts (image indices), and its seed."""

    fold: int
    head: str
    fit_images: np.ndarray
    stop_images: np.ndarray
    evaluated: np.ndarray
    seed: int
    objective: Objective | None = None   # what the head is fitted to predict (None: classes)


def fit_one(fold_bags: tuple[Bags, Bags, Bags], y: np.ndarray, settings: FitSettings, width: int,
            job: FoldJob) -> tuple[Head, np.ndarray]:
    """(the fitted head, its outputs on the evaluated bags): one fold's head, wherever it runs.
    ``fold_bags``: the (fit, stopping, evaluated) bags of the job's fold (``select_fold``)."""
    fit_bags, stop_bags, eval_bags = fold_bags
    head = get_head(job.head)(getattr(settings, job.head), width, job.seed, job.objective).fit(
        fit_bags, y[fit_bags.image], stop_bags, y[stop_bags.image])
    return head, head.predict(eval_bags)


def select_fold(bags: Bags, job: FoldJob) -> tuple[Bags, Bags, Bags]:
    return bags.select(job.fit_images), bags.select(job.stop_images), bags.select(job.evaluated)


def run_local(bags: Bags, y: np.ndarray, settings: FitSettings, width: int, jobs: list[FoldJob]):
    """Every job in this process, one after another (``fit --engine local``); a fold's heads share its bags."""
    fold, fold_bags = None, None
    for job in jobs:
        if job.fold != fold:
            fold, fold_bags = job.fold, select_fold(bags, job)
        yield fit_one(fold_bags, y, settings, width, job)


def fit_heads(bags: Bags, y: np.ndarray, groups: np.ndarray, settings: FitSettings, seed: int, width: int,
              fold: np.ndarray, on_fold=lambda k: None, runner=run_local, strata: np.ndarray | None = None,
              objective: Objective | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[list[Head]], list[dict]]:
    """Every head on every fold of ``fold``: (OOF image outputs, OOF bag outputs, models per fold, info per fold).

    The inner (fit, stopping) split and the heads' seeds depend on (seed, fold) alone, so heads fitted on
    another encoder's features with the same ``fold`` see the very same images. ``runner(bags, y, settings,
    width, jobs)`` gives each job's (head, outputs) in order: here (``run_local``) or as Ray tasks
    (``engines.RayFolds``). ``strata`` (default ``y``) balances the inner split; ``objective`` is what every head
    is fitted to predict (default: classes).
    """
    names = list(settings.heads)
    N = len(y)
    bags.means()   # once for every fold: each fold's bags take theirs, and heads on means never copy the rows
    z = {h: np.zeros((N, width), dtype=np.float32) for h in names}
    z_bags = {h: np.zeros((bags.n_bags, width), dtype=np.float32) for h in names}
    jobs, info = [], []
    for k in range(settings.folds):
        evaluated = np.flatnonzero(fold == k)
        training = np.flatnonzero(fold != k)
        fit_imgs, stop_imgs = inner_split(training, y if strata is None else strata, groups,
                                          settings.inner_val_fraction, derived_seed(seed, k, 1))
        jobs += [FoldJob(k, name, fit_imgs, stop_imgs, evaluated, derived_seed(seed, k, 2), objective)
                 for name in names]
        info.append({"fold": k, "evaluated_images": int(len(evaluated)), "fit_images": int(len(fit_imgs)),
                     "stopping_images": int(len(stop_imgs))})
    models: list[list[Head]] = [[] for _ in range(settings.folds)]
    for job, (head, zb) in zip(jobs, runner(bags, y, settings, width, jobs)):
        if not np.isfinite(zb).all():
            raise UserError(f"fold {job.fold}'s {job.head} head predicted NaN or infinity (seed {seed})",
                            hint=f"the features are finite, so the head diverged: check the [fit.{job.head}] "
                                 "settings in histoembed.toml (a lower learning rate)")
        eval_bags = bags.select(job.evaluated)
        z_bags[job.head][eval_bags.index] = zb
        z[job.head][eval_bags.images()] = eval_bags.per_image(zb)
        models[job.fold].append(head)
        info[job.fold][job.head] = head.fitted_info()
        if len(models[job.fold]) == len(names):
            on_fold(job.fold)
    return z, z_bags, models, info
