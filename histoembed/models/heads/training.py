"""The training loop the torch heads share (MLP, attention-MIL).

AdamW, linear warm-up then cosine decay per step, shuffled mini-batches from a seeded
generator, and early stopping on the image-level NLL of the caller's inner split: the best
epoch's weights are kept. Deterministic on the CPU for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoembed.models.heads import objectives
from histoembed.models.heads.base import Bags, Head, write_tensors


MIN_STEPS_PER_EPOCH = 8


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay towards 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def effective_batch_size(samples: int, batch_size: int) -> int:
    """``batch_size``, made smaller for small training sets so an epoch has at least 8 steps
    (otherwise a few hundred samples would get one update per epoch and barely train)."""
    return max(1, min(batch_size, math.ceil(samples / MIN_STEPS_PER_EPOCH)))


def input_scale(std):
    """Per-dimension divisor: the std, but never below 1% of the median std. A feature that is
    (nearly) constant in the training folds, e.g. a ReLU channel that never fires, would
    otherwise blow up the first time it moves on a held-out image."""
    return std.clamp_min(max(1e-6, 0.01 * float(std.median())))


@dataclass
class Trained:
    best_epoch: int | None
    epochs_run: int
    stop_nll: float | None


def train(net, n_samples: int, batch_loss: Callable, stop_nll: Callable[[], float] | None, *, lr: float,
          weight_decay: float, epochs: int, warmup_epochs: int, batch_size: int, patience: int,
          seed: int, shuffle: Callable | None = None) -> Trained:
    """Train ``net`` in place: ``batch_loss(indices)`` gives a mini-batch's loss, ``stop_nll()``
    the inner split's image-level NLL (None: no early stopping, all epochs). ``shuffle(generator)``
    gives an epoch's order of the samples (default: a uniform permutation)."""
    import torch

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    batch = effective_batch_size(n_samples, batch_size)
    steps_per_epoch = math.ceil(n_samples / batch)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, total))
    gen = torch.Generator().manual_seed(seed)

    best, best_state, best_epoch, waited, run = math.inf, None, None, 0, 0
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(n_samples, generator=gen) if shuffle is None else shuffle(gen)
        for start in range(0, n_samples, batch):
            loss = batch_loss(order[start:start + batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        run = epoch + 1
        if stop_nll is None:
            best_epoch = run
            continue
        net.eval()
        nll = stop_nll()
        if nll < best - 1e-6:
            best, waited, best_epoch = nll, 0, run
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return Trained(best_epoch, run, None if best is math.inf else float(best))


class TorchHead(Head):
    """A head whose model is a torch module from ``build_net``: its early-stopping state and its
    safetensors file (``weights_file``), saved and loaded the same way for every such head."""

    weights_file: str

    tasks = ("classification", "survival", "regression")   # objectives.torch_outcome_loss beside cross-entropy

    def __init__(self, settings=None, n_classes: int = 2, seed: int = 0, objective=None):
        super().__init__(settings, n_classes, seed, objective)
        self.net_ = None
        self.best_epoch_ = None
        self.epochs_run_ = 0
        self.stop_nll_ = None
        self.target_scale_ = (0.0, 1.0)   # regression: the net predicts (target - mean) / std

    def outcome_training(self, y_samples: np.ndarray, stop: Bags, y_stop: np.ndarray):
        """Survival or regression: (y as a float tensor, loss(out, idx), early-stopping loss or None), the
        training target standardised for regression (``objectives``)."""
        import torch

        y = np.asarray(y_samples, dtype=np.float64)
        if self.objective.task == "regression":
            self.target_scale_ = objectives.target_scale(y)
        y_t = torch.from_numpy(y.astype(np.float32))
        stop_y = stop.image_labels(y_stop) if stop.n_bags else None
        stop_loss = (lambda: objectives.stop_loss(self.objective, stop.per_image(self.predict(stop)), stop_y)) \
            if stop.n_bags else None
        return y_t, lambda out, idx: objectives.torch_outcome_loss(self.objective, out, y_t[idx], self.target_scale_), \
            stop_loss

    def to_target(self, out: np.ndarray) -> np.ndarray:
        """The net's outputs on the task's scale (regression: the standardised target back in its units)."""
        if self.objective.task != "regression":
            return out
        mean, std = self.target_scale_
        return (np.asarray(out, dtype=np.float64) * std + mean).astype(np.float32)

    @staticmethod
    def build_net(input_dim: int, n_classes: int, settings):
        raise NotImplementedError

    def fitted_info(self) -> dict:
        out = {"best_epoch": self.best_epoch_, "epochs_run": self.epochs_run_, "stop_nll": self.stop_nll_,
               "input_normalisation": "(x - input_mean) / input_std, tensors in " + self.weights_file}
        if self.objective.task == "regression":
            out["target_scale"] = list(self.target_scale_)
        return out

    def _save_arrays(self, folder: Path) -> None:
        from safetensors.torch import save_file

        write_tensors(save_file, {k: v.contiguous() for k, v in self.net_.state_dict().items()},
                      folder / self.weights_file)

    def _load_arrays(self, folder: Path, info: dict) -> None:
        from safetensors.torch import load_file

        net = self.build_net(self.input_dim_, self.n_classes, self.settings)
        net.load_state_dict(load_file(str(self._require(folder / self.weights_file))), strict=True)
        self.net_ = net.eval()
        self.best_epoch_, self.epochs_run_ = info.get("best_epoch"), info.get("epochs_run", 0)
        self.target_scale_ = tuple(info.get("target_scale", (0.0, 1.0)))
