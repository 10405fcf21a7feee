"""Late fusion of N calibrated members: ``sum_i w_i * z_i / T_i`` with weights on the simplex.

Members are heads (MLP, XGBoost, ...) or encoders, each with its own temperature. The weights
are the ones with the best macro-F1 on held-out logits (the caller cross-fits: the weights
applied to a fold are chosen on the other folds):

- up to three members, every point of a simplex grid with steps of ``1 / (points - 1)``;
- more members, a coordinate search from equal weights: each member's weight in turn takes
  every grid value, the others rescaled to keep the sum 1, until no move improves macro-F1.

Ties go to equal weights (an even mix is the prior when the data cannot tell the members
apart), then to the lexicographically smallest weight vector. With two members this is the
reference recipe's rule exactly: ``w * z_mlp / T_mlp + (1 - w) * z_xgb / T_xgb``, w on
``linspace(0, 1, points)``, ties to the w closest to 0.5, then the smaller w.

Within the noise (``nll_within``, used when the members come from several encoders): after the
search above, the weights move to the lowest NLL of the fused probabilities among the weight
vectors whose macro-F1 stays within ``nll_within`` of the best found (the lattice: every such
point; the search: coordinate moves that lower the NLL and keep macro-F1 there). A member whose
logits carry no signal makes macro-F1 flat along its weight, so macro-F1 alone lets chance pick
that weight (its calibrated logits are near zero, so a large weight on it costs nothing in argmax
but dilutes every other member); the NLL does not, and takes its weight to about 0.

API for other stages (e.g. fusing encoders): ``choose_weights(logits, labels, temperatures)``
returns a ``FusionChoice``; ``fuse_members(logits, choice.weights, temperatures)`` applies it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoembed.maths.metrics import macro_f1, softmax

GRID_MAX_MEMBERS = 3
SEARCH_ROUNDS = 10


@dataclass(frozen=True)
class FusionChoice:
    weights: tuple[float, ...]        # one per member, on the simplex
    macro_f1: float                   # on the logits that chose them (the ``score`` when one was given)
    scores: list[float] | None = None  # two members: that score at each w on the grid (the first member's weight)


def weight_grid(points: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, points)


def fuse_members(logits: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray,
                 temperatures: Sequence[float] | None = None) -> np.ndarray:
    """``sum_i weights[i] * logits[i] / temperatures[i]`` in float64 (weights and T may be arrays that broadcast)."""
    temperatures = [1.0] * len(logits) if temperatures is None else temperatures
    if not (len(logits) == len(weights) == len(temperatures)) or not len(logits):
        raise ValueError(f"{len(logits)} members, {len(weights)} weights, {len(temperatures)} temperatures")
    out = 0.0
    for z, w, t in zip(logits, weights, temperatures):
        out = out + w * np.asarray(z, dtype=np.float64) / t
    return out


def fuse(z_mlp: np.ndarray, z_xgb: np.ndarray, w: float, t_mlp: float = 1.0, t_xgb: float = 1.0) -> np.ndarray:
    """Two members: ``w * z_mlp / t_mlp + (1 - w) * z_xgb / t_xgb``."""
    return fuse_members([z_mlp, z_xgb], [w, 1 - w], [t_mlp, t_xgb])


def _tie_key(weights: np.ndarray) -> tuple:
    """Closest to equal weights first, then lexicographically smallest."""
    n = len(weights)
    return (round(float(np.sum((weights - 1.0 / n) ** 2)), 12), tuple(weights))


def _lattice(n_members: int, points: int) -> list[np.ndarray]:
    """Every weight vector on the simplex grid; the last weight is 1 minus the others (as in ``1 - w``)."""
    grid = weight_grid(points)
    steps = points - 1
    out = []
    for ks in itertools.product(range(points), repeat=n_members - 1):
        if sum(ks) <= steps:
            head = np.array([grid[k] for k in ks])
            out.append(np.r_[head, 1.0 - head.sum()] if n_members > 1 else np.array([1.0]))
    return out


def choose_weights(logits: Sequence[np.ndarray], labels: np.ndarray, temperatures: Sequence[float] | None = None,
                   points: int = 21, nll_within: float | None = None, score=None) -> FusionChoice:
    """Simplex weights with the best macro-F1 of the fused held-out ``logits`` (see the module docstring).

    ``score(labels, probabilities)`` (higher better, e.g. ``metrics.selection_score("auroc", C)``) replaces
    macro-F1 when given (``fit --select-by``); it reads the softmax of the fused logits.
    """
    n_classes = np.asarray(logits[0]).shape[1] if len(logits) else 0
    measure = _macro_f1_of(n_classes) if score is None else _score_of(score)
    choice = _choose_weights(logits, labels, temperatures, points, measure)
    if nll_within is None or len(logits) < 2:
        return choice
    return _lowest_nll_within(logits, labels, temperatures, points, choice, nll_within, measure)


def _macro_f1_of(n_classes: int):
    return lambda labels, fused: macro_f1(labels, fused.argmax(axis=1), n_classes)


def _score_of(score):
    """``score`` of the fused logits' probabilities; an undefined value never wins."""
    def measure(labels, fused):
        value = float(score(labels, softmax(fused)))
        return value if np.isfinite(value) else -np.inf
    return measure


def _nll(fused: np.ndarray, labels: np.ndarray) -> float:
    shifted = fused - fused.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def _lowest_nll_within(logits, labels, temperatures, points: int, choice: FusionChoice, within: float,
                       measure) -> FusionChoice:
    labels = np.asarray(labels)
    n_members = len(logits)
    temperatures = [1.0] * n_members if temperatures is None else list(temperatures)
    floor = choice.macro_f1 - within

    def both(w: np.ndarray) -> tuple[float, float]:
        fused = fuse_members(logits, w, temperatures)
        return measure(labels, fused), _nll(fused, labels)

    w = np.asarray(choice.weights)
    f1, nll = both(w)
    if n_members <= GRID_MAX_MEMBERS:
        for trial in _lattice(n_members, points):
            f, loss = both(trial)
            if f >= floor - 1e-12 and (loss < nll - 1e-12 or (abs(loss - nll) <= 1e-12 and f > f1)):
                w, f1, nll = trial, f, loss
    else:
        for _ in range(SEARCH_ROUNDS * n_members):
            moved = False
            for i in range(n_members):
                for value in weight_grid(points):
                    trial = _with_weight(w, i, value)
                    f, loss = both(trial)
                    if f >= floor - 1e-12 and loss < nll - 1e-12:
                        w, f1, nll, moved = trial, f, loss, True
            if not moved:
                break
    return FusionChoice(tuple(float(v) for v in w), float(f1), choice.scores)


def _choose_weights(logits: Sequence[np.ndarray], labels: np.ndarray, temperatures: Sequence[float] | None,
                    points: int, measure) -> FusionChoice:
    labels = np.asarray(labels)
    n_members = len(logits)
    if n_members == 0:
        raise ValueError("fusion needs at least one member")
    temperatures = [1.0] * n_members if temperatures is None else list(temperatures)

    def score(w: np.ndarray) -> float:
        return measure(labels, fuse_members(logits, w, temperatures))

    if n_members == 1:
        w = np.array([1.0])
        return FusionChoice((1.0,), score(w))
    if n_members <= GRID_MAX_MEMBERS:
        candidates = _lattice(n_members, points)
        scores = [score(w) for w in candidates]
        best = max(scores)
        ties = [w for w, s in zip(candidates, scores) if s >= best - 1e-12]
        w = min(ties, key=_tie_key)
        curve = [float(s) for s in scores] if n_members == 2 else None
        return FusionChoice(tuple(float(v) for v in w), float(best), curve)

    # coordinate search from equal weights; a move must strictly improve macro-F1
    w = np.full(n_members, 1.0 / n_members)
    best = score(w)
    for _ in range(SEARCH_ROUNDS):
        moved = False
        for i in range(n_members):
            for value in weight_grid(points):
                trial = _with_weight(w, i, value)
                s = score(trial)
                if s > best + 1e-12:
                    w, best, moved = trial, s, True
        if not moved:
            break
    return FusionChoice(tuple(float(v) for v in w), float(best))


def _with_weight(w: np.ndarray, i: int, value: float) -> np.ndarray:
    """``w`` with member i at ``value`` and the others rescaled to sum to ``1 - value``."""
    rest = np.delete(w, i)
    total = rest.sum()
    rest = rest * (1 - value) / total if total > 0 else np.full(len(rest), (1 - value) / len(rest))
    return np.insert(rest, i, value)


def choose_weight(z_mlp: np.ndarray, z_xgb: np.ndarray, labels: np.ndarray, t_mlp: float, t_xgb: float,
                  points: int = 21) -> tuple[float, list[float]]:
    """Two members: (best w of the first, macro-F1 at each grid point)."""
    choice = choose_weights([z_mlp, z_xgb], labels, [t_mlp, t_xgb], points)
    return choice.weights[0], choice.scores
