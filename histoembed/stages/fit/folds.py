"""Folds: stratified by label, grouped (no patient or duplicate group in two folds), seeded; and the
inner (fit, stopping) split of a fold's training images."""

from __future__ import annotations

import numpy as np


def derived_seed(*parts: int) -> int:
    """A 32-bit seed that depends only on ``parts`` (e.g. the run seed and a fold)."""
    return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


def _group_kfold(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of scikit-learn's ``StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)``.

    The same folds, made fast: scikit-learn scores each fold for each group in a Python loop
    (``_find_best_fold``), which took about a sixth of ``fit --folds 10`` on 691 images; here
    all folds are scored at once with the same arithmetic, so the choice is identical (checked
    against scikit-learn in the tests).
    """
    y = np.asarray(y)
    _, y_inv, y_cnt = np.unique(y, return_inverse=True, return_counts=True)
    if np.all(n_splits > y_cnt):
        raise ValueError(f"n_splits={n_splits} cannot be greater than the number of members in each class.")
    _, groups_inv, groups_cnt = np.unique(groups, return_inverse=True, return_counts=True)
    n_groups, n_classes = len(groups_cnt), len(y_cnt)
    if n_splits > n_groups:
        raise ValueError(f"Cannot have number of splits n_splits={n_splits} greater than the number of groups: "
                         f"{n_groups}.")
    per_group = np.zeros((n_groups, n_classes))
    np.add.at(per_group, (groups_inv.reshape(-1), y_inv.reshape(-1)), 1)
    perm = np.arange(n_groups)
    np.random.RandomState(seed).shuffle(perm)           # as check_random_state(seed) does
    per_group = per_group[perm]
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(n_groups)
    groups_inv = inv_perm[groups_inv.reshape(-1)]
    per_fold = np.zeros((n_splits, n_classes))
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    adds = np.eye(n_splits)[:, :, None]                  # candidate i adds the group to fold i only
    for g in np.argsort(-np.std(per_group, axis=1), kind="stable"):
        counts = per_group[g]
        evals = np.std((per_fold[None] + adds * counts) / y_cnt.reshape(1, 1, -1), axis=1).mean(axis=1)
        sizes = per_fold.sum(axis=1)
        best, best_eval, best_size = 0, np.inf, np.inf
        for i in range(n_splits):   # scikit-learn's tie rule: close scores go to the smaller fold
            e = evals[i]
            if e < best_eval or (abs(e - best_eval) <= 1e-8 + 1e-5 * abs(best_eval) and sizes[i] < best_size):
                best, best_eval, best_size = i, e, sizes[i]
        per_fold[best] += counts
        fold_of_group[g] = best
    fold = fold_of_group[groups_inv]
    everything = np.arange(len(y))
    return [(everything[fold != k], everything[fold == k]) for k in range(n_splits)]


def make_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per image: stratified by label, no group in two folds, seeded."""
    fold = np.full(len(y), -1, dtype=np.int64)
    for k, (_, test) in enumerate(_group_kfold(y, groups, n_folds, seed)):
        fold[test] = k
    return fold


def inner_split(images: np.ndarray, y: np.ndarray, groups: np.ndarray, fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split training ``images`` (indices) into (fit, stopping), stratified and group-aware."""
    n_splits = max(2, round(1 / fraction))
    # Tiny sets: fewer splits (a larger stopping share) rather than none.
    n_splits = min(n_splits, int(np.unique(y[images], return_counts=True)[1].max(initial=0)))
    if n_splits < 2 or len(np.unique(groups[images])) < n_splits:
        return images, images[:0]
    _, stop = _group_kfold(y[images], groups[images], n_splits, seed)[0]
    mask = np.zeros(len(images), dtype=bool)
    mask[stop] = True
    return images[~mask], images[mask]

