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
           on_fold=lambda k: None) -> CVResult:
    """One full cross-validation with ``seed``: folds, heads, OOF outputs, cross-fitted decisions."""
    strata = task.strata(y)
    fold = make_folds(strata, groups, settings.folds, seed)
    z, z_bags, models, info = fit_heads(bags, y, groups, settings, seed, task.width, fold, on_fold,
                                        strata=strata, objective=task.objective)
    per_fold, final = task.decide(z, y, fold)
    return CVResult(seed, list(settings.heads), fold, z, z_bags, bags.image, per_fold, final, models, info)


def cross_validate(bags: Bags, y: np.ndarray, groups: np.ndarray, settings: FitSettings,
                   task: Task) -> list[tuple[CVResult, dict]]:
    """One cross-validation per seed (``settings.seeds`` of them) and its numbers; only the first keeps its models."""
    results: list[tuple[CVResult, dict]] = []
    with progress("folds") as bar:
        for seed in seeds_of(settings):
            bar_task = bar.add_task(f"fit, seed {seed}", total=settings.folds)
            cv = run_cv(bags, y, groups, settings, seed, task, on_fold=lambda k, t=bar_task: bar.advance(t))
            results.append((cv, task.measure(cv, y, settings)))
            if len(results) > 1:
                cv.models = []
    return results


def seeds_of(settings: FitSettings) -> list[int]:
    return [settings.seed + i for i in range(settings.seeds)]


def fit_heads(bags: Bags, y: np.ndarray, groups: np.ndarray, settings: FitSettings, seed: int, width: int,
              fold: np.ndarray, on_fold=lambda k: None, strata: np.ndarray | None = None,
              objective: Objective | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[list[Head]], list[dict]]:
    """Every head on every fold of ``fold``: (OOF image outputs, OOF bag outputs, models per fold, info per fold).

    The inner (fit, stopping) split and the heads' seeds depend on (seed, fold) alone, so heads fitted on
    another encoder's features with the same ``fold`` see the very same images. ``strata`` (default ``y``)
    balances the inner split; ``objective`` is what every head is fitted to predict (default: classes).
    """
    names = list(settings.heads)
    N = len(y)
    bags.means()   # once for every fold: each fold's bags take theirs, and heads on means never copy the rows
    z = {h: np.zeros((N, width), dtype=np.float32) for h in names}
    z_bags = {h: np.zeros((bags.n_bags, width), dtype=np.float32) for h in names}
    models, info = [], []
    for k in range(settings.folds):
        evaluated = np.flatnonzero(fold == k)
        training = np.flatnonzero(fold != k)
        fit_imgs, stop_imgs = inner_split(training, y if strata is None else strata, groups, settings.inner_val_fraction, derived_seed(seed, k, 1))
        head_seed = derived_seed(seed, k, 2)
        fit_bags, stop_bags, eval_bags = bags.select(fit_imgs), bags.select(stop_imgs), bags.select(evaluated)
        fold_models, fold_info = [], {"fold": k, "evaluated_images": int(len(evaluated)),
                                      "fit_images": int(len(fit_imgs)), "stopping_images": int(len(stop_imgs))}
        for name in names:
            cls = get_head(name)
            head = cls(getattr(settings, name), width, head_seed, objective).fit(
                fit_bags, y[fit_bags.image], stop_bags, y[stop_bags.image])
            zb = head.predict(eval_bags)
            if not np.isfinite(zb).all():
                raise UserError(f"fold {k}'s {name} head predicted NaN or infinity (seed {seed})",
                                hint=f"the features are finite, so the head diverged: check the [fit.{name}] "
                                     "settings in histoembed.toml (a lower learning rate)")
            z_bags[name][eval_bags.index] = zb
            z[name][eval_bags.images()] = eval_bags.per_image(zb)
            fold_models.append(head)
            fold_info[name] = head.fitted_info()
        models.append(fold_models)
        info.append(fold_info)
        on_fold(k)
    return z, z_bags, models, info
