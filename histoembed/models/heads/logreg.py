"""The linear probe: multinomial logistic regression on each bag's mean embedding.

The field's standard baseline for frozen features: if a linear probe on image means does as
well as the MLP, the MLP is not earning its keep. Inputs are standardised with the training
rows' mean and std; the L2 strength is chosen from ``c_grid`` by the image-level NLL of the
caller's inner split (fitted along the path from strong to weak regularisation, each fit
warm-started from the last). Weights, bias and standardisation go to one safetensors file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from histoembed.core.config import LogRegSettings
from histoembed.models.heads.base import Bags, Head, write_tensors
from histoembed.models.heads.calibration import temperature_nll

WEIGHTS_FILE = "logreg.safetensors"
ABSENT_CLASS_LOGIT = -30.0   # a class missing from the training rows is never predicted


class LogRegHead(Head):
    name = "logreg"
    Settings = LogRegSettings
    gives_attention = False      # reads each bag's mean: no per-crop view
    scores_crops = False
    description = "logistic-regression probe on per-view image means (linear baseline)"

    weights_file = WEIGHTS_FILE

    def __init__(self, settings: LogRegSettings | None = None, n_classes: int = 2, seed: int = 0, objective=None):
        super().__init__(settings, n_classes, seed, objective)
        self.coef_ = None          # [C, D] on standardised inputs
        self.intercept_ = None     # [C]
        self.mean_ = None
        self.scale_ = None
        self.c_ = None
        self.stop_nll_ = None

    def fit_scaling(self, X: np.ndarray) -> np.ndarray:
        """Set the standardisation from the training means ``X``; ``X`` standardised."""
        self.input_dim_ = int(X.shape[1])
        self.mean_ = X.mean(axis=0)
        std = X.std(axis=0)
        self.scale_ = np.maximum(std, max(1e-6, 0.01 * float(np.median(std))))
        return self._standardise(X)

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_

    def _logits_std(self, Xs: np.ndarray) -> np.ndarray:
        return Xs @ self.coef_.T.astype(np.float64) + self.intercept_

    def fit(self, bags: Bags, y: np.ndarray, stop: Bags, y_stop: np.ndarray) -> LogRegHead:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        s, C = self.settings, self.n_classes
        X, y = bags.means().astype(np.float64), np.asarray(y)
        Xs = self.fit_scaling(X)
        Xs_stop = self._standardise(stop.means()) if stop.n_bags else None
        stop_labels = stop.image_labels(y_stop) if stop.n_bags else None
        model = LogisticRegression(max_iter=s.max_iter, warm_start=True,
                                   class_weight="balanced" if s.class_weights else None)
        best = None
        grid = sorted(s.c_grid) if Xs_stop is not None else [sorted(s.c_grid)[len(s.c_grid) // 2]]
        for c in grid:
            model.set_params(C=c)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(Xs, y)
            coef, intercept = self._full(model, X.shape[1], C)
            nll = None
            if Xs_stop is not None:
                z = Xs_stop @ coef.T + intercept
                nll = temperature_nll(stop.per_image(z), stop_labels, 1.0)
            if best is None or (nll is not None and nll < best[0] - 1e-9):
                best = (nll, c, coef, intercept)
        self.stop_nll_, self.c_, coef, intercept = best
        self.coef_, self.intercept_ = coef.astype(np.float32), intercept.astype(np.float64)
        return self

    @staticmethod
    def _full(model, dim: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """[C, D] weights and [C] bias over all classes (a binary fit is one row; absent classes get a floor)."""
        coef = np.zeros((n_classes, dim))
        intercept = np.full(n_classes, ABSENT_CLASS_LOGIT)
        present = model.classes_.astype(np.int64)
        if len(present) == 2 and model.coef_.shape[0] == 1:
            coef[present[1]], intercept[present[1]] = model.coef_[0], model.intercept_[0]
            intercept[present[0]] = 0.0
        else:
            coef[present], intercept[present] = model.coef_, model.intercept_
        return coef, intercept

    def predict(self, bags: Bags) -> np.ndarray:
        if bags.n_bags == 0:
            return np.zeros((0, self.n_classes), np.float32)
        return self._logits_std(self._standardise(bags.means())).astype(np.float32)

    def fitted_info(self) -> dict:
        return {"C": self.c_, "stop_nll": self.stop_nll_, "input": "per (image, view): mean crop embedding",
                "logits": "((x - mean) / scale) @ coef.T + intercept, tensors in " + WEIGHTS_FILE}

    def _save_arrays(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        write_tensors(save_file, {"coef": np.ascontiguousarray(self.coef_, np.float32),
                                  "intercept": self.intercept_.astype(np.float64),
                                  "mean": self.mean_.astype(np.float64), "scale": self.scale_.astype(np.float64)},
                      folder / self.weights_file)

    def _load_arrays(self, folder: Path, info: dict) -> None:
        from safetensors.numpy import load_file

        t = load_file(str(self._require(folder / self.weights_file)))
        self.coef_, self.intercept_, self.mean_, self.scale_ = t["coef"], t["intercept"], t["mean"], t["scale"]
        self.c_ = info.get("C")
