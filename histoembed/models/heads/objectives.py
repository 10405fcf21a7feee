"""What a head is fitted to predict (issue 29): a class (logits), a risk (survival) or a number (regression).

A head is built with an :class:`Objective`; the heads that can fit more than classification switch their loss
or objective on it and keep every other code path (inputs, early stopping, files):

- classification: ``y`` is a class index per sample, the output one logit per class;
- survival: ``y`` is [n, 2] (time, event) per sample, the output one risk per sample (a log hazard ratio:
  higher = earlier event), trained with Cox's partial likelihood (``cox_loss``);
- regression: ``y`` is the target per sample, the output the predicted target, trained with squared error or
  Huber's loss on the target standardised by the training rows' mean and std (kept with the head).

Early stopping reads :func:`stop_loss` of the inner split's image outputs: the NLL of the classes, the Cox
partial likelihood of the risks, or the mean squared error of the predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histoembed.core.errors import UserError
from histoembed.models.heads.cox_loss import cox_partial_likelihood_loss

TASKS = ("classification", "survival", "regression")
OUTPUT = {"survival": "risk", "regression": "prediction"}   # the one output column of each outcome task
HUBER_DELTA = 1.0   # in standard deviations of the training target


@dataclass(frozen=True)
class Objective:
    task: str = "classification"
    loss: str = "squared"          # regression only: squared | huber

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r} (one of {', '.join(TASKS)})")

    @property
    def outcome(self) -> bool:
        """Survival or regression: one output per sample, no classes."""
        return self.task != "classification"

    def record(self) -> dict:
        return {"task": self.task, **({"loss": self.loss} if self.task == "regression" else {})}

    @classmethod
    def of(cls, info: dict) -> Objective:
        """The objective a saved head's JSON names (classification for heads saved before issue 29)."""
        return cls(info.get("task", "classification"), info.get("loss", "squared"))


def target_scale(y: np.ndarray) -> tuple[float, float]:
    """(mean, std) of regression targets; std 1 for a constant target."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    std = float(y.std()) if len(y) else 1.0
    return (float(y.mean()) if len(y) else 0.0), (std if std > 1e-12 else 1.0)


def torch_outcome_loss(objective: Objective, out, y, scale: tuple[float, float] = (0.0, 1.0)):
    """The loss of torch outputs ``out`` [n, 1] for outcome ``y`` (a tensor: [n, 2] time and event, or [n])."""
    import torch.nn.functional as F

    out = out.reshape(-1)
    if objective.task == "survival":
        return cox_partial_likelihood_loss(out, y[:, 0], y[:, 1])
    target = (y.reshape(-1).to(out.dtype) - scale[0]) / scale[1]
    if objective.loss == "huber":
        return F.huber_loss(out, target, delta=HUBER_DELTA)
    return F.mse_loss(out, target)


def stop_loss(objective: Objective, z: np.ndarray, y: np.ndarray) -> float:
    """The early-stopping loss of image outputs ``z`` [n, 1] for outcome ``y`` (lower is better)."""
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    if objective.task == "survival":
        import torch

        y = np.asarray(y, dtype=np.float64)
        return float(cox_partial_likelihood_loss(torch.from_numpy(z), y[:, 0], y[:, 1]))
    return float(np.mean((z - np.asarray(y, dtype=np.float64).reshape(-1)) ** 2))


def check_task(head_cls, objective: Objective) -> None:
    """Refuse a head that does not declare ``objective.task`` (a clear error, never a silent classifier)."""
    if objective.task not in head_cls.tasks:
        raise UserError(f"the {head_cls.name} head does not fit the {objective.task} task "
                        f"(it fits {', '.join(head_cls.tasks)})",
                        hint=f"choose --heads among those that fit {objective.task}")
