"""Which crops drove an image's call: per-crop maps from the fitted fold ensemble, for the report to draw.

Two kinds of head see single crops, and declare it (``heads.base.Head``): one that *gives attention* over a
bag (attention-MIL: how much each crop weighed in its image's call) and one that *scores crops* (the MLP: each
crop's own probabilities). A map takes the attention when a head gives it, else the crop scores; always of
the clean view (view 0) of the image's crops, averaged over folds, beside the call on the image as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histoembed.core import feature_store
from histoembed.models.heads import REGISTRY
from histoembed.models.heads.base import CAPABILITIES
from histoembed.models.inference import Ensemble


def heads_that(can: str) -> list[str]:
    """The registered heads that declare ``can`` (``"gives_attention"`` or ``"scores_crops"``)."""
    if can not in CAPABILITIES:
        raise ValueError(f"{can!r} is no head capability ({', '.join(CAPABILITIES)})")
    return [name for name, head in REGISTRY.items() if getattr(head, can)]


def heads_that_see_crops() -> list[str]:
    """The registered heads with a per-crop view: attention over a bag, or scores of single crops."""
    return [name for name, head in REGISTRY.items() if head.gives_attention or head.scores_crops]


@dataclass
class CropMap:
    """One image's (or slide's) crops and how much each drove the call."""

    crop_index: np.ndarray   # [crops]: the image's crops (clean view), in the features' order
    weight: np.ndarray       # [crops] in [0, 1]: attention relative to the most attended crop (largest 1),
    #                          or the crop's probability of the class the image was called
    called: int              # the class the image was called, an index into the ensemble's classes (0: outcome)
    prob: float              # the image's probability of that class (survival / regression: its risk / prediction)


class CropMaps:
    """The fold ensemble over the clean view of a run's crops; ``of(key)`` maps one image (``split/image_id``).

    ``attention``: weigh crops by the attention of the head that gives it (the default when one does), else
    by the probabilities of the head that scores crops. The ensemble must read single crops (one encoder,
    ``--scale-fusion crops``) and have such a head: the caller checks, as it words what is missing.
    """

    def __init__(self, ensemble: Ensemble, features: feature_store.Features, attention: bool | None = None):
        gives_attention = ensemble.member_that("gives_attention") is not None
        self.attention = gives_attention if attention is None else attention
        can = "gives_attention" if self.attention else "scores_crops"
        if ensemble.encoders or ensemble.scale_fusion != "crops" or ensemble.member_that(can) is None:
            raise ValueError(f"no per-crop map: the ensemble has no single-encoder member that {can} on crops")
        self.ensemble = ensemble
        self.clean = features.subset(features.view == 0)
        self.keys = self.clean.keys()

    def images(self) -> set[str]:
        """``split/image_id`` of every image with a clean view of its crops."""
        return set(self.keys.tolist())

    def of(self, key: str) -> CropMap | None:
        """The map of one image (None when it has no crop in the features)."""
        crops = self.clean.subset(self.keys == key)
        if not len(crops.image_id):
            return None
        image = self.ensemble.predict(crops)
        if self.ensemble.outcome:
            return self._outcome_map(crops, float(image.value[0]))
        called = int(image.pred[0])
        if self.attention:   # attention is a share of the bag: scaled so the image's most attended crop is 1
            weight = np.asarray(self.ensemble.crop_attention(crops), dtype=np.float64)
            weight = weight / max(weight.max(), 1e-12)
        else:
            weight = np.asarray(self.ensemble.predict_crops(crops))[:, called]
        return CropMap(np.asarray(crops.crop_index), weight, called, float(np.asarray(image.probs)[0, called]))

    def _outcome_map(self, crops: feature_store.Features, value: float) -> CropMap:
        """Survival or regression: attention as for a class, or each crop's own risk (prediction) scaled to [0, 1]
        within the image (the image's highest-risk crop 1); ``prob`` holds the image's risk or prediction."""
        if self.attention:
            weight = np.asarray(self.ensemble.crop_attention(crops), dtype=np.float64)
            weight = weight / max(weight.max(), 1e-12)
        else:
            own = np.asarray(self.ensemble.predict_crops(crops), dtype=np.float64)[:, 0]
            span = own.max() - own.min()
            weight = (own - own.min()) / span if span > 1e-12 else np.ones_like(own)
        return CropMap(np.asarray(crops.crop_index), weight, 0, value)
