"""The XGBoost head: gradient-boosted trees on image-level embeddings.

One sample per (image, view): the mean of that view's crop embeddings. The embeddings are
first projected by a PCA fitted inside the fold (on the training rows only), which makes
boosting on 1024-d features several times faster at no cost in accuracy. Multi-class
softmax, ``hist`` trees (on CUDA when XGBoost was built with it and a GPU is present),
early stopping on the caller's inner split, seeded, all cores.

Files: the booster in XGBoost's own UBJSON format, the PCA mean and components in a
safetensors file, the settings in JSON. Nothing is pickled.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from histoembed.core import cpus, store
from histoembed.core.config import XGBSettings
from histoembed.models.heads.base import Bags, Head, write_tensors
from histoembed.models.heads.indexing import class_weights

MODEL_FILE = "xgb.ubj"
PCA_FILE = "xgb_pca.safetensors"


def fit_pca(X: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], components [k, D]) of the top ``dims`` principal axes of ``X``.

    Eigen-decomposition of the D x D covariance: exact, deterministic, fast for D ~ 1000.
    The sign of each axis is fixed (largest loading positive) so the same data always gives
    the same projection.
    """
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(axis=0)
    k = max(1, min(dims, X.shape[1], max(1, X.shape[0] - 1)))
    Xc = X - mean
    values, vectors = np.linalg.eigh(Xc.T @ Xc)
    components = vectors[:, ::-1][:, :k].T
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1, signs)[:, None]
    return mean.astype(np.float32), np.ascontiguousarray(components, dtype=np.float32)


def project(X: np.ndarray, mean: np.ndarray | None, components: np.ndarray | None) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X if mean is None else (X - mean) @ components.T


@cache
def xgb_device() -> str:
    """``cuda`` when XGBoost was built with CUDA and a GPU is visible, else ``cpu``."""
    import xgboost

    if not xgboost.build_info().get("USE_CUDA"):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sample_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Each sample weighted by the inverse frequency of its class (the MLP head's class weights)."""
    return class_weights(y, n_classes)[y]


class XGBHead(Head):
    """Fit on each bag's mean embedding (one sample per image and view); logits are the softmax margins."""

    name = "xgb"
    Settings = XGBSettings
    gives_attention = False      # reads each bag's mean: no per-crop view
    scores_crops = False
    description = "XGBoost on per-view image means, PCA inside the fold (the reference recipe)"

    def __init__(self, settings: XGBSettings | None = None, n_classes: int = 2, seed: int = 0):
        super().__init__(settings, n_classes, seed)
        self.booster_ = None
        self.pca_mean_ = None
        self.pca_components_ = None
        self.best_iteration_ = None

    def params(self) -> dict:
        s = self.settings
        return {"objective": "multi:softprob", "num_class": self.n_classes, "tree_method": "hist",
                "device": xgb_device(), "max_depth": s.max_depth, "eta": s.learning_rate,
                "subsample": s.subsample, "colsample_bytree": s.colsample_bytree, "max_bin": s.max_bin,
                "min_child_weight": s.min_child_weight, "eval_metric": "mlogloss", "seed": self.seed,
                "nthread": cpus.threads()}

    def fit(self, bags: Bags, y: np.ndarray, stop: Bags, y_stop: np.ndarray) -> XGBHead:
        return self.fit_means(bags.means(), y, stop.means(), y_stop)

    def fit_means(self, X: np.ndarray, y: np.ndarray, X_stop: np.ndarray, y_stop: np.ndarray) -> XGBHead:
        """Fit on mean embeddings directly (one row per sample)."""
        import xgboost

        s = self.settings
        self.input_dim_ = int(X.shape[1])
        if s.pca_dims and s.pca_dims < X.shape[1]:
            self.pca_mean_, self.pca_components_ = fit_pca(X, s.pca_dims)
        y = np.asarray(y)
        weight = sample_weights(y, self.n_classes) if s.class_weights else None
        dtrain = xgboost.DMatrix(self._project(X), label=y, weight=weight)
        evals, stop = [], None
        if len(y_stop):
            evals = [(xgboost.DMatrix(self._project(X_stop), label=np.asarray(y_stop)), "stop")]
            stop = s.early_stopping_rounds
        booster = xgboost.train(self.params(), dtrain, num_boost_round=s.n_estimators, evals=evals,
                                early_stopping_rounds=stop, verbose_eval=False)
        best = getattr(booster, "best_iteration", None) if stop else None
        self.best_iteration_ = int(best) if best is not None else s.n_estimators - 1
        self.booster_ = booster[: self.best_iteration_ + 1]
        return self

    def _project(self, X: np.ndarray) -> np.ndarray:
        return project(X, self.pca_mean_, self.pca_components_)

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Margins of mean embeddings (one row per sample)."""
        import xgboost

        if len(X) == 0:
            return np.zeros((0, self.n_classes), np.float32)
        margin = self.booster_.predict(xgboost.DMatrix(self._project(X)), output_margin=True)
        return np.asarray(margin, dtype=np.float32).reshape(len(X), self.n_classes)

    def predict(self, bags: Bags) -> np.ndarray:
        return self.logits(bags.means())

    def fitted_info(self) -> dict:
        return {"best_iteration": self.best_iteration_, "pca": PCA_FILE if self.pca_mean_ is not None else None,
                "input": "per (image, view): the mean of the view's crop embeddings",
                "output": "untransformed multi:softprob margins (logits)"}

    def _save_arrays(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        with store.atomic_path(folder / MODEL_FILE) as tmp:
            tmp.write_bytes(bytes(self.booster_.save_raw(raw_format="ubj")))
        if self.pca_mean_ is not None:
            write_tensors(save_file, {"mean": self.pca_mean_, "components": self.pca_components_}, folder / PCA_FILE)

    def _load_arrays(self, folder: Path, info: dict) -> None:
        import xgboost
        from safetensors.numpy import load_file

        booster = xgboost.Booster()
        booster.load_model(str(self._require(folder / MODEL_FILE)))
        booster.set_param({"device": xgb_device(), "nthread": cpus.threads()})
        self.booster_ = booster
        self.best_iteration_ = info.get("best_iteration")
        if info.get("pca"):
            pca = load_file(str(self._require(folder / PCA_FILE)))
            self.pca_mean_, self.pca_components_ = pca["mean"], pca["components"]
