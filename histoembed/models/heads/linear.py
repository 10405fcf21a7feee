"""The linear heads of the outcome tasks (issue 29), on each bag's mean embedding like the linear probe:

- ``ridge`` (regression): scikit-learn's ridge regression, its L2 strength (1 / C, ``c_grid`` of ``[fit.ridge]``)
  chosen by the squared error of the caller's inner split;
- ``coxnet`` (survival): scikit-survival's CoxNet, a penalised (elastic-net) Cox model fitted along a path of
  penalties, the penalty chosen by the Cox partial likelihood of the caller's inner split; the output is the
  linear predictor (a log hazard ratio).

Both reuse the linear probe's standardisation (training rows' mean and std) and its safetensors file of
``coef`` [1, D] and ``intercept`` [1]: prediction is the probe's own code path.
"""

from __future__ import annotations

import warnings

import numpy as np

from histoembed.core.config import CoxNetSettings, LogRegSettings
from histoembed.core.errors import UserError
from histoembed.models.heads import objectives
from histoembed.models.heads.base import Bags
from histoembed.models.heads.logreg import LogRegHead


ALPHA_MIN_RATIO = 0.05   # CoxNet's path stops at this share of its largest penalty (smaller ones overfit)


class RidgeHead(LogRegHead):
    name = "ridge"
    Settings = LogRegSettings     # [fit.ridge] c_grid: the L2 strengths are 1 / C
    tasks = ("regression",)
    weights_file = "ridge.safetensors"
    description = "ridge regression on per-view image means (regression's linear baseline)"

    def fit(self, bags: Bags, y: np.ndarray, stop: Bags, y_stop: np.ndarray) -> RidgeHead:
        from sklearn.linear_model import Ridge

        Xs = self.fit_scaling(bags.means().astype(np.float64))
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        grid = sorted(1.0 / c for c in self.settings.c_grid)
        if not stop.n_bags:
            grid = [grid[len(grid) // 2]]
        best = None
        for alpha in grid:
            model = Ridge(alpha=alpha).fit(Xs, y)
            coef, intercept = model.coef_.reshape(1, -1), np.array([model.intercept_], dtype=np.float64)
            loss = None
            if stop.n_bags:
                z = self._standardise(stop.means()) @ coef.T + intercept
                loss = objectives.stop_loss(self.objective, stop.per_image(z), stop.image_labels(y_stop))
            if best is None or (loss is not None and loss < best[0] - 1e-12):
                best = (loss, alpha, coef, intercept)
        self.stop_nll_, self.c_, coef, intercept = best
        self.coef_, self.intercept_ = coef.astype(np.float32), intercept
        return self

    def fitted_info(self) -> dict:
        return {"C": self.c_, "alpha": self.c_, "stop_loss": self.stop_nll_,
                "input": "per (image, view): mean crop embedding",
                "prediction": "((x - mean) / scale) @ coef.T + intercept, tensors in " + self.weights_file}


class CoxNetHead(LogRegHead):
    name = "coxnet"
    Settings = CoxNetSettings
    tasks = ("survival",)
    weights_file = "coxnet.safetensors"
    description = "penalised linear Cox model (scikit-survival's CoxNet) on per-view image means"

    def fit(self, bags: Bags, y: np.ndarray, stop: Bags, y_stop: np.ndarray) -> CoxNetHead:
        from sksurv.linear_model import CoxnetSurvivalAnalysis
        from sksurv.util import Surv

        s = self.settings
        Xs = self.fit_scaling(bags.means().astype(np.float64))
        y = np.asarray(y, dtype=np.float64)
        if not (y[:, 1] > 0).any():
            raise UserError("a fold's training rows have no event: CoxNet cannot fit",
                            hint="use fewer --folds, or a cohort with more events")
        model = CoxnetSurvivalAnalysis(l1_ratio=s.l1_ratio, n_alphas=s.n_alphas, alpha_min_ratio=ALPHA_MIN_RATIO,
                                       max_iter=100_000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model.fit(Xs, Surv.from_arrays(y[:, 1] > 0, y[:, 0]))
            except ArithmeticError as e:
                raise UserError(f"CoxNet did not converge ({e})",
                                hint="lower [fit.coxnet] l1_ratio or n_alphas in histoembed.toml") from None
        paths = model.coef_          # [D, alphas]
        pick = paths.shape[1] // 2
        losses = None
        if stop.n_bags:
            Xs_stop, y_img = self._standardise(stop.means()), stop.image_labels(y_stop)
            losses = [objectives.stop_loss(self.objective, stop.per_image(Xs_stop @ paths[:, [i]]), y_img)
                      for i in range(paths.shape[1])]
            pick = int(np.nanargmin(losses)) if np.isfinite(losses).any() else pick
        self.c_ = float(model.alphas_[pick])
        self.stop_nll_ = None if losses is None else float(losses[pick])
        self.coef_ = paths[:, pick].reshape(1, -1).astype(np.float32)
        self.intercept_ = np.zeros(1, dtype=np.float64)
        return self

    def fitted_info(self) -> dict:
        return {"C": self.c_, "alpha": self.c_, "stop_loss": self.stop_nll_,
                "input": "per (image, view): mean crop embedding",
                "risk": "((x - mean) / scale) @ coef.T (a log hazard ratio), tensors in " + self.weights_file}
