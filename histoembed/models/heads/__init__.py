"""The classification heads of the fit stage and the maths that calibrates, fuses and decides.

Heads share one contract (``base.Head``: fit / predict logits / save / load) and are
registered here, in one place:

- ``mlp``: a small torch MLP on crop-view embeddings (the reference recipe);
- ``xgb``: XGBoost on per-view image means, with a PCA fitted inside the fold (the reference recipe);
- ``logreg``: a logistic-regression probe on per-view image means (the linear baseline);
- ``abmil``: gated attention-MIL over each view's crops (attention weights for the crop maps);
- ``ridge``, ``coxnet`` (``linear``): the linear heads of regression and survival.

Each head declares the tasks it fits (``tasks``; ``objectives``): classification, survival (a risk, Cox),
regression (a number).

And the decisions on their held-out logits: ``calibration`` (a regularised temperature per
member), ``fusion`` (simplex weights for N members, by macro-F1), ``offsets`` (per-class
offsets for macro-F1), ``conformal`` (split-conformal prediction sets).
"""

from __future__ import annotations

from histoembed.core.errors import UserError
from histoembed.models.heads.abmil import ABMILHead
from histoembed.models.heads.base import Bags, Head
from histoembed.models.heads.linear import CoxNetHead, RidgeHead
from histoembed.models.heads.logreg import LogRegHead
from histoembed.models.heads.mlp import MLPHead
from histoembed.models.heads.xgb import XGBHead

REGISTRY: dict[str, type[Head]] = {cls.name: cls for cls in (MLPHead, XGBHead, LogRegHead, ABMILHead, RidgeHead,
                                                              CoxNetHead)}


def get(name: str) -> type[Head]:
    """The head class registered as ``name``; a clear error naming the others."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown head {name!r}", hint="choose from " + ", ".join(REGISTRY)) from None


def check_names(names) -> tuple[str, ...]:
    """Validated, de-duplicated head names in the given order."""
    out = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not out:
        raise UserError("no head given", hint="e.g. --heads mlp,xgb; choose from " + ", ".join(REGISTRY))
    for n in out:
        get(n)
    return out


__all__ = ["REGISTRY", "Bags", "Head", "check_names", "get"]
