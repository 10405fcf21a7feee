"""The fitted fold ensemble that submit, predict and report load: inference apart from training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoembed import store
from histoembed.errors import UserError
from histoembed.heads import calibration, fusion
from histoembed.heads.mlp import MLPHead
from histoembed.heads.shared import first_seen_index, image_mean, view_means
from histoembed.heads.xgb import XGBHead
from histoembed.metrics import softmax


@dataclass
class ImagePredictions:
    image_ids: list[str]      # first-seen order in the features
    probs: np.ndarray         # [images, classes], calibrated, fused, averaged over folds


@dataclass
class Ensemble:
    """Every fold's heads with the final temperatures and fusion weight."""

    classes: list[str]
    encoder: str
    encoder_slug: str
    dim: int
    feature_key: str | None
    heads: list[tuple[MLPHead, XGBHead]]
    t_mlp: float
    t_xgb: float
    w: float
    manifest: dict

    def _check(self, features: store.Features) -> None:
        dim = features.embedding.shape[1] if features.embedding.ndim == 2 else None
        if dim is not None and len(features) and dim != self.dim:
            raise UserError(f"the features are {dim}-d but the models were fitted on {self.dim}-d features",
                            hint=f"embed with the models' encoder ({self.encoder}) or re-run `histoembed fit`")
        enc, fitted_on = features.meta.get("encoder"), self.manifest.get("feature_encoder")
        if enc is not None and fitted_on is not None and enc != fitted_on:
            raise UserError(f"the features come from encoder {enc!r} but the models were fitted on {fitted_on!r}",
                            hint=f"pass --encoder {self.encoder}, or re-run `histoembed fit` on these features")

    def predict(self, features: store.Features) -> ImagePredictions:
        """Image probabilities: MLP logits averaged over crop-views, XGBoost over view means, fused."""
        self._check(features)
        if len(features) == 0:
            return ImagePredictions([], np.zeros((0, len(self.classes))))
        image_ids, row_image = first_seen_index(features.image_id)
        n = len(image_ids)
        X_pairs, pair_image = view_means(features, row_image)
        probs = np.zeros((n, len(self.classes)))
        for mlp, xgb in self.heads:
            z_mlp = image_mean(mlp.row_logits(features.embedding), row_image, n)
            z_xgb = image_mean(xgb.logits(X_pairs), pair_image, n)
            probs += softmax(fusion.fuse(z_mlp, z_xgb, self.w, self.t_mlp, self.t_xgb))
        return ImagePredictions([str(i) for i in image_ids], probs / len(self.heads))

    def predict_crops(self, features: store.Features) -> np.ndarray:
        """Per feature row (crop-view): calibrated MLP probabilities averaged over folds."""
        self._check(features)
        probs = np.zeros((len(features), len(self.classes)))
        for mlp, _ in self.heads:
            probs += softmax(calibration.apply_temperature(mlp.row_logits(features.embedding), self.t_mlp))
        return probs / max(1, len(self.heads))


def load_ensemble(run: Path) -> Ensemble:
    """The fitted models of ``run/models``; a clear error when any file is missing."""
    models = Path(run) / store.MODELS_DIR
    manifest = store.read_json(models / store.MODELS_MANIFEST_FILE, "fitted-models manifest", hint="run `histoembed fit` first")
    try:
        folds, final = int(manifest["folds"]), manifest["final"]
        classes, dim = list(manifest["classes"]), int(manifest["dim"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the manifest lacks {e}", path=models / store.MODELS_MANIFEST_FILE,
                        hint="re-run `histoembed fit`") from None
    heads = []
    for k in range(folds):
        folder = store.fold_dir(models, k)
        if not folder.is_dir():
            raise UserError(f"fold {k} of {folds} is missing", path=folder, hint="re-run `histoembed fit`")
        mlp, mlp_info = MLPHead.load(folder)
        xgb, xgb_info = XGBHead.load(folder)
        for info in (mlp_info, xgb_info):
            if info.get("classes") != classes or int(info.get("input_dim", -1)) != dim:
                raise UserError("this fold's models were fitted on other classes or another feature dimension "
                                "than the manifest says", path=folder, hint="re-run `histoembed fit`")
        heads.append((mlp, xgb))
    return Ensemble(classes, manifest.get("encoder", ""), manifest.get("encoder_slug", ""), dim,
                    manifest.get("feature_key"), heads, float(final["T_mlp"]), float(final["T_xgb"]),
                    float(final["w"]), manifest)
