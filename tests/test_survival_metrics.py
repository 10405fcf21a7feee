"""The survival numbers equal scikit-survival's on the same data (tied times, tied risks, censoring), a
no-signal control's interval holds 0.5, and the Cox loss fits scikit-survival's Cox model."""

from __future__ import annotations

import numpy as np
import pytest

from histoembed.maths import survival, survival_curves


def cohort(n: int = 240, signal: float = 1.0, seed: int = 0):
    """Exponential times driven by x (hazard exp(signal * x)), independent censoring, times rounded to
    whole units so that many tie (events with events, events with censorings); risks rounded too."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t = np.ceil(rng.exponential(np.exp(-signal * x)) * 10)
    c = np.ceil(rng.exponential(1.5, n) * 10)
    return np.minimum(t, c), (t <= c).astype(int), np.round(x, 1)


def surv(time, event):
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event, bool), time=time)


def test_concordances_equal_scikit_survival_with_ties_and_censoring():
    from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc
    from sksurv.nonparametric import CensoringDistributionEstimator

    time, event, risk = cohort()
    assert len(np.unique(time)) < len(time) / 3 and len(np.unique(risk)) < len(risk) / 3  # ties on both sides
    y = surv(time, event)
    assert survival.harrell_c(time, event, risk) == pytest.approx(
        concordance_index_censored(event.astype(bool), time, risk)[0], abs=1e-12)
    assert survival.uno_c(time, event, risk) == pytest.approx(concordance_index_ipcw(y, y, risk)[0], abs=1e-12)
    assert survival.uno_c(time, event, risk, tau=12) == pytest.approx(
        concordance_index_ipcw(y, y, risk, tau=12)[0], abs=1e-12)
    quartiles = survival.event_quartiles(time, event)
    np.testing.assert_allclose(survival.time_auc(time, event, risk, quartiles),
                               cumulative_dynamic_auc(y, y, risk, quartiles)[0], atol=1e-12)
    g = CensoringDistributionEstimator().fit(y)
    np.testing.assert_allclose(survival.censoring_survival(time, event), g.predict_proba(time), atol=1e-12)
    np.testing.assert_allclose(survival.concordances(time, event, risk, quartiles)[:3],
                               [survival.harrell_c(time, event, risk), survival.uno_c(time, event, risk),
                                survival.time_auc(time, event, risk, quartiles[:1])[0]])
    # a small hand-checked case: 1 event at t=2 (risk 3) against t=3 (risk 1), a censored t=2 (risk 3: tie);
    # the event at t=3 has no later row; two events at t=1 are not compared with each other
    t, e, r = np.array([1, 1, 2, 2, 3.]), np.array([1, 1, 1, 0, 1]), np.array([5, 0, 3, 3, 1.])
    assert survival.harrell_c(t, e, r) == pytest.approx(concordance_index_censored(e.astype(bool), t, r)[0])


def test_kaplan_meier_logrank_and_breslow_equal_scikit_survival():
    from sksurv.compare import compare_survival
    from sksurv.linear_model.coxph import BreslowEstimator
    from sksurv.nonparametric import kaplan_meier_estimator

    time, event, risk = cohort(seed=1)
    curve = survival_curves.kaplan_meier(time, event)
    st, sp = kaplan_meier_estimator(event.astype(bool), time)
    np.testing.assert_allclose(curve.time, st)
    np.testing.assert_allclose(curve.survival, sp, atol=1e-12)
    high = risk > np.median(risk)
    chi2, p = survival_curves.logrank(time, event, high)
    s_chi2, s_p = compare_survival(surv(time, event), high)
    assert (chi2, p) == pytest.approx((s_chi2, s_p), rel=1e-9)
    base = survival_curves.breslow(time, event, risk)
    ref = BreslowEstimator().fit(risk, event.astype(bool), time)
    np.testing.assert_allclose(base.cum_hazard, ref.cum_baseline_hazard_.y, rtol=1e-9)
    horizon = float(np.median(time))
    expected = np.array([f(horizon) for f in ref.get_survival_function(risk[:20])])
    np.testing.assert_allclose(base.survival(risk[:20], horizon), expected, rtol=1e-9)
    halves = survival_curves.risk_halves(time, event, risk)
    assert halves["logrank_p"] == pytest.approx(s_p) and halves["n_low"] + halves["n_high"] == len(time)
    at = {k: survival_curves.Curve(*(np.array(halves[k][f]) for f in ("time", "survival", "at_risk", "events")))
          for k in ("low", "high")}
    assert halves["logrank_p"] < 1e-6 and at["high"].at(horizon) < at["low"].at(horizon) - 0.2


def test_the_calibration_table_of_the_true_model_lies_on_the_diagonal():
    rng = np.random.default_rng(2)
    x = rng.normal(size=3000)
    t = rng.exponential(np.exp(-x))               # true hazard exp(x), baseline hazard 1
    time, event = np.minimum(t, 2.0), (t <= 2.0).astype(int)   # administrative censoring at 2
    horizon = 0.7
    predicted = survival_curves.breslow(time, event, x).survival(x, horizon)
    np.testing.assert_allclose(predicted, np.exp(-horizon * np.exp(x)), atol=0.04)
    table = survival_curves.calibration_table(time, event, predicted, horizon, bins=4)
    assert [row["rows"] for row in table] == [750] * 4
    for row in table:
        assert row["observed_lo"] - 0.02 <= row["predicted"] <= row["observed_hi"] + 0.02
    assert table[0]["predicted"] < table[-1]["predicted"]
    with pytest.raises(ValueError, match="row 1"):
        survival_curves.check_survival([1.0, -2.0], [1, 0])
    with pytest.raises(ValueError, match="row 0"):
        survival_curves.check_survival([1.0, 2.0], [2, 0])


def test_the_no_signal_interval_holds_one_half_and_the_planted_signal_is_well_above():
    time, event, risk = cohort(n=200, signal=1.0, seed=3)
    patients = np.arange(200) // 2                # two slides per patient
    planted = survival.survival_numbers(time, event, risk, groups=patients, n=200, seed=0)
    assert planted["unit"] == "patients" and planted["harrell_c"]["lo"] > 0.62
    assert planted["uno_c"]["lo"] > 0.6 and all(a["lo"] > 0.55 for a in planted["time_auc"]["at"])
    noise = np.random.default_rng(9).normal(size=200)
    control = survival.survival_numbers(time, event, noise, groups=patients, n=200, seed=0)
    for number in (control["harrell_c"], control["uno_c"], *control["time_auc"]["at"]):
        assert number["lo"] < 0.5 < number["hi"]
    import json
    json.dumps(planted, allow_nan=False)


def test_cox_loss_matches_the_partial_likelihood_and_fits_scikit_survivals_cox_model():
    import torch
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    from histoembed.models.heads.cox_loss import cox_partial_likelihood_loss

    time, event, _ = cohort(n=150, seed=4)
    rng = np.random.default_rng(4)
    X = np.stack([np.log(time) * -0.5 + rng.normal(size=150), rng.normal(size=150)], 1)
    eta = X @ np.array([0.7, -0.3])
    at_risk = time[None, :] >= time[:, None]      # reference: Breslow's risk sets
    ref = -np.sum(event * (eta - np.log((at_risk * np.exp(eta)[None, :]).sum(1)))) / event.sum()
    loss = cox_partial_likelihood_loss(torch.tensor(eta), torch.tensor(time), torch.tensor(event))
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    beta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    Xt = torch.tensor(X)
    for _ in range(25):                           # Newton steps on the convex loss (torch.optim loads slowly)
        grad = torch.autograd.grad(cox_partial_likelihood_loss(Xt @ beta, time, event), beta, create_graph=True)[0]
        hessian = torch.stack([torch.autograd.grad(g, beta, retain_graph=True)[0] for g in grad])
        with torch.no_grad():
            beta -= torch.linalg.solve(hessian, grad)
    expected = CoxPHSurvivalAnalysis(ties="breslow").fit(X, surv(time, event)).coef_
    np.testing.assert_allclose(beta.detach().numpy(), expected, atol=1e-5)
    risk = torch.randn(5, requires_grad=True)     # no event in the batch: zero loss, zero gradient
    empty = cox_partial_likelihood_loss(risk, torch.arange(5.0), torch.zeros(5))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(risk.grad, torch.zeros(5))
