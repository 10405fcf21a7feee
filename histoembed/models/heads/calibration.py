"""Temperature scaling that holds on small, nearly separable data: one T > 0 per member.

Dividing logits by one positive number never changes their argmax, so calibration cannot
change a prediction, only how confident it is.

Why not the plain NLL minimiser. With strong frozen features the held-out logits of a few
hundred images are often *separable*: every image's true class already has the largest
logit. The NLL of ``logits / T`` then keeps falling as T -> 0, so the minimiser runs to the
bottom of its search range (T about 0.02 on real H&E), and the first mistake on new data
costs a huge NLL (0.07 before calibration, 0.76 after, in the run that showed it).

What we do instead. n held-out images cannot show an error rate below about 1 / (n + 1)
(Laplace's rule of succession), so T is fitted to **smoothed targets**: each image's target
puts ``1 - eps`` on its label and ``eps`` spread evenly over the classes, ``eps = 1 / (n + 1)``
(one unseen pseudo-image). The smoothed NLL has a finite minimiser even on separable logits:
the T whose confidence matches the accuracy the data can support. With many images and real
mistakes eps is negligible and T is the ordinary NLL estimate (an overconfident model still
gets T > 1). A weak Gaussian prior on log T (centred on T = 1, sd ``PRIOR_SD``) adds a little
curvature, so a flat objective (logits that carry no information) settles at T = 1.

When the data cannot support a temperature (too few images, one class, logits without spread,
or an estimate at the search bound) the temperature is 1 and ``Temperature.note`` says why;
the fit stage copies the note into ``metrics.json`` and the report. Non-finite logits are an
error (a head diverged), never a silent T = 1.

A temperature only where it helps (``cross_fitted_temperatures``). On a dozen slides even the
regularised T can raise the held-out NLL, so a T is applied only when it lowers the NLL of images
that did not choose it. Fold k's T is fitted on the other folds' OOF logits; a nested check
(leave one of those other folds out: fit T on the rest, score the one left out, against T = 1)
decides whether it is applied, else T = 1 (the nested fits may use as few as ``NESTED_MIN_IMAGES``
images: a noisier inner T scores worse on the fold left out, so it tends to make the check stricter,
not laxer). The final T (for the test set) is fitted on all folds and checked the same way one
level up: each fold scored with the T fitted on the other folds. Last, a
guard: if the temperatures so decided still raise the head's out-of-fold NLL (as the fit reports
it) above T = 1's, every fold and the final keep T = 1, so the reported calibration never costs NLL.
The guard is one yes/no per head, taken on the reported rows; it can only turn calibration off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histoembed.core.errors import UserError
from histoembed.maths.metrics import log_softmax, nll, softmax

LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))
PRIOR_SD = 2.0          # sd of log T: T within [e^-4, e^4] ~ [0.02, 55] at two sd
MIN_IMAGES = 8          # fewer held-out images than this cannot support a temperature
NESTED_MIN_IMAGES = 4   # the nested check's own fits may use fewer images than MIN_IMAGES
CHECK_MARGIN = 1e-9     # a temperature must lower the checked NLL by more than this per image


@dataclass(frozen=True)
class Temperature:
    """A fitted temperature and, when it is 1 because the data could not support one, why."""

    value: float
    note: str | None = None

    def as_dict(self) -> dict:
        return {"T": self.value, "note": self.note}


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / temperature)`` at the true labels."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(labels)), np.asarray(labels)].mean())


def smoothing(n: int) -> float:
    """Target mass spread over the classes: one pseudo-image in n + 1."""
    return 1.0 / (n + 1)


def regularised_objective(logits: np.ndarray, labels: np.ndarray, log_t: float) -> float:
    """Mean cross-entropy of smoothed targets plus the log T prior (per image)."""
    n, C = logits.shape
    eps = smoothing(n)
    logp = log_softmax(logits / np.exp(log_t))
    ce = -(1 - eps) * logp[np.arange(n), labels].mean() - eps * logp.mean(axis=1).mean()
    return float(ce + log_t ** 2 / (2 * PRIOR_SD ** 2 * n))


def check_finite(logits: np.ndarray, what: str = "logits") -> None:
    bad = ~np.isfinite(logits).all(axis=1) if logits.ndim == 2 else ~np.isfinite(logits)
    if bad.any():
        raise UserError(f"{int(bad.sum())} of {len(bad)} held-out {what} are not finite (NaN or infinite): "
                        "a head diverged, so no temperature can be fitted",
                        hint="check the features for NaN/inf, or lower the head's learning rate")


def choose_temperature(logits: np.ndarray, labels: np.ndarray, min_images: int | None = None) -> Temperature:
    """The regularised temperature of held-out ``logits`` (see the module docstring); T = 1 on fewer than
    ``min_images`` (default ``MIN_IMAGES``)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    check_finite(logits)
    n = len(labels)
    min_images = MIN_IMAGES if min_images is None else min_images
    if n < min_images:
        return Temperature(1.0, f"only {n} held-out images (a temperature needs at least {min_images})")
    if len(np.unique(labels)) < 2:
        return Temperature(1.0, "the held-out images are all of one class")
    spread = logits - logits.mean(axis=1, keepdims=True)
    if np.abs(spread).max() < 1e-9:
        return Temperature(1.0, "the logits do not differ between classes")
    result = minimize_scalar(lambda log_t: regularised_objective(logits, labels, log_t),
                             bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5})
    log_t = float(result.x)
    if min(abs(log_t - LOG_T_BOUNDS[0]), abs(log_t - LOG_T_BOUNDS[1])) < 1e-3:
        return Temperature(1.0, f"the estimate ran to the search bound (T = {np.exp(log_t):.3g})")
    return Temperature(float(np.exp(log_t)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """``choose_temperature(...).value``: the T in [0.01, 100] to divide the logits by."""
    return choose_temperature(logits, labels).value


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return np.asarray(logits, dtype=np.float64) / temperature


@dataclass(frozen=True)
class Checked:
    """A temperature after the check: the estimate, whether it is applied, and why (in words)."""

    value: float          # the T to divide by: ``fitted`` when applied, else 1
    fitted: float         # the estimate on the rows that chose it (1 when they could not support one)
    applied: bool
    why: str

    @property
    def note(self) -> str | None:
        """Why T = 1 (None when a temperature is applied), as ``Temperature.note``."""
        return None if self.applied else self.why

    def kept(self, why: str) -> Checked:
        """T = 1 because of ``why``; one already at 1 keeps its own reason."""
        return Checked(1.0, self.fitted, False, why) if self.applied else self


def cross_fitted_temperatures(logits: np.ndarray, labels: np.ndarray,
                              fold: np.ndarray) -> tuple[list[Checked], Checked]:
    """(per fold, in ``np.unique(fold)`` order, the temperature applied to it; the final one).

    See the module docstring: fold k's T only when a nested check says it helps, the final one likewise.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    fold = np.asarray(fold)
    check_finite(logits)
    folds = [int(k) for k in np.unique(fold)]
    fits: dict[frozenset, Temperature] = {}

    def fitted(left_out: frozenset, nested: bool = False) -> Temperature:
        if left_out not in fits:
            rows = ~np.isin(fold, list(left_out))
            fits[left_out] = choose_temperature(logits[rows], labels[rows],
                                                min(MIN_IMAGES, NESTED_MIN_IMAGES) if nested else None)
        return fits[left_out]

    def decide(left_out: frozenset) -> Checked:
        candidate = fitted(left_out)
        if candidate.note:
            return Checked(1.0, 1.0, False, candidate.note)
        checked = [j for j in folds if j not in left_out]
        if len(checked) < 2:
            return Checked(1.0, candidate.value, False, "a single fold chose it, which leaves no fold to check it on")
        with_t = at_one = 0.0
        inner = [fitted(left_out | {j}, nested=True) for j in checked]
        if all(t.note for t in inner):
            return Checked(1.0, candidate.value, False, f"nothing to check it on: every nested fit had {inner[0].note}")
        for j, t in zip(checked, inner):
            rows = fold == j
            with_t += temperature_nll(logits[rows], labels[rows], t.value) * rows.sum()
            at_one += temperature_nll(logits[rows], labels[rows], 1.0) * rows.sum()
        n = int(np.isin(fold, checked).sum())
        verdict = (f"NLL {with_t / n:.4f} with T vs {at_one / n:.4f} at T = 1 on {n} items of {len(checked)} "
                   "folds, each scored with a T fitted without it")
        if with_t < at_one - CHECK_MARGIN * n:
            return Checked(candidate.value, candidate.value, True, "it lowers the held-out " + verdict)
        return Checked(1.0, candidate.value, False, f"T = {candidate.value:.3g} did not lower the held-out " + verdict)

    per_fold = [decide(frozenset({k})) for k in folds]
    final = decide(frozenset())
    t_row = np.array([per_fold[folds.index(int(k))].value for k in fold])[:, None]
    before, after = nll(softmax(logits), labels), nll(softmax(logits / t_row), labels)
    if after > before:
        why = (f"the temperatures applied fold by fold raised the out-of-fold NLL ({before:.4f} at T = 1, "
               f"{after:.4f} with them), so every fold keeps T = 1")
        return [c.kept(why) for c in per_fold], final.kept(why)
    return per_fold, final
