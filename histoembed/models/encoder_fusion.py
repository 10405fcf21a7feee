"""Several encoders, one decision: the (encoder, head) members of a multi-encoder fit.

``fit --encoder A,B`` fits every head on each encoder's feature store, on the same folds.
Two ways to bring the encoders together (``--encoder-fusion``):

- ``logits``: every (encoder, head) pair is one fusion member, named ``<encoder slug>:<head>``
  (``member_name``); its models live in ``models/fold-XX/<encoder slug>/``, and the members'
  calibrated logits are fused with cross-fitted simplex weights as heads are, with one more rule:
  among the weights within two images' worth of the best macro-F1, the lowest NLL (so an encoder
  without signal gets about no weight, see ``heads.fusion``).
- ``concat``: each head reads one input, the encoders' embeddings side by side. Each encoder's
  block is centred per dimension and divided by one scalar, the root of its mean per-dimension
  variance (``block_scaling``), so neither encoder dominates by its scale alone while each keeps its
  own geometry. The statistics come from the training split's rows, without labels, and are
  kept in the models manifest so test and new images are scaled alike.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from histoembed.core import feature_store
from histoembed.core.errors import UserError

SEPARATOR = ":"   # encoder slugs hold only letters, digits and -_. so the first ':' splits a member name
CONCAT_RULE = ("each head reads the encoders' embeddings side by side; each encoder's block centred per dimension "
               "and divided by the root of its mean per-dimension variance (training rows, no labels)")
LOGITS_RULE = ("every (encoder, head) pair is a member: sum over members of w_m * z_m / T_m, weights on the simplex "
               "by macro-F1, then the lowest NLL within two images' worth of the best macro-F1; temperatures and "
               "weights of each fold chosen on the other folds")


def member_name(slug: str, head: str) -> str:
    return f"{slug}{SEPARATOR}{head}"


def split_member(member: str) -> tuple[str | None, str]:
    """(encoder slug, head) of a member name; (None, head) for a plain head name."""
    slug, sep, head = member.partition(SEPARATOR)
    return (slug, head) if sep else (None, member)


def block_scaling(X: np.ndarray) -> dict:
    """Per-dimension mean and one scale of an encoder's [rows, D] embeddings (see the module docstring)."""
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(axis=0) if len(X) else np.zeros(X.shape[1])
    scale = float(np.sqrt(np.mean((X - mean) ** 2))) if len(X) else 1.0
    return {"mean": mean.astype(np.float32).tolist(), "scale": scale if scale > 1e-12 else 1.0}


def concat_features(parts: list[feature_store.Features], scalings: list[dict]) -> feature_store.Features:
    """The encoders' features (the same rows, in the same order) side by side, each block scaled."""
    first = parts[0]
    for f in parts[1:]:
        if not (len(f) == len(first) and np.array_equal(f.image_id, first.image_id)
                and np.array_equal(f.split, first.split) and np.array_equal(f.crop_index, first.crop_index)
                and np.array_equal(f.view, first.view)):
            raise UserError("the encoders' feature stores hold different rows",
                            hint="run `histoembed embed --encoder X` for each encoder on the same crops")
    blocks = [((f.embedding - np.asarray(s["mean"], np.float32)) / np.float32(s["scale"])).astype(np.float32)
              for f, s in zip(parts, scalings)]
    return replace(first, embedding=np.concatenate(blocks, axis=1) if blocks else first.embedding,
                   meta={"encoder": None, "key": None, "encoders": [f.meta.get("encoder") for f in parts]})
