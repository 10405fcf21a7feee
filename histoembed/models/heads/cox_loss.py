"""The Cox partial-likelihood loss for torch heads that predict a risk (survival task, issue 29).

A head outputs one number per bag or row, its risk eta (a log hazard ratio: higher = earlier event). Cox's
partial likelihood asks, at each observed event, how likely it was that *this* patient had the event among
all still at risk then:

    loss = -(1 / D) * sum over events i of [ eta_i - log sum over j with t_j >= t_i of exp(eta_j) ]

with D the number of events. Ties in time follow Breslow: every patient with the same time is in each
other's risk set, and each tied event counts once (scikit-survival's ``CoxPHSurvivalAnalysis(ties=
"breslow")`` and lifelines' default fit the same likelihood; tests/test_survival_metrics.py fits a linear
model with this loss and recovers scikit-survival's coefficients). Censored rows enter only the risk sets.

In mini-batches the risk sets are the batch's own rows (the usual stochastic approximation, DeepSurv's):
larger batches give a closer approximation; balance batches on the event where the cohort has few.
A batch without any event has no term: the loss is an exact zero that still depends on ``risk`` (so
``backward()`` works and gives zero gradients), and the step changes nothing but the optimiser's state.
Only the order of ``time`` matters, so any unit works. The loss is invariant to adding a constant to
every risk: a Cox head needs no bias, and its risks are comparable only within one fitted model.
"""

from __future__ import annotations


def cox_partial_likelihood_loss(risk, time, event):
    """Mean negative log partial likelihood (Breslow ties) of ``risk`` [n] (or [n, 1]) given ``time`` [n] and
    ``event`` [n] (1 observed, 0 censored); a torch scalar, 0 for a batch without an event."""
    import torch

    risk = risk.reshape(-1)
    time = torch.as_tensor(time, device=risk.device).reshape(-1).to(risk.dtype)
    event = torch.as_tensor(event, device=risk.device).reshape(-1).to(risk.dtype)
    if risk.shape != time.shape or risk.shape != event.shape:
        raise ValueError(f"risk {tuple(risk.shape)}, time {tuple(time.shape)} and event {tuple(event.shape)} differ")
    n_events = event.sum()
    if n_events.item() == 0:
        return (risk * 0.0).sum()
    order = torch.argsort(time, descending=True, stable=True)
    r, t, e = risk[order], time[order], event[order]
    log_cum = torch.logcumsumexp(r, dim=0)              # log sum of exp(risk) over rows with a later or equal time
    last_tied = torch.searchsorted(-t, -t, right=True) - 1  # the risk set of a tied time includes all its rows
    log_risk_set = log_cum[last_tied]
    return -((r - log_risk_set) * e).sum() / n_events
