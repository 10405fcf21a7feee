"""The report of a survival or regression run (issue 29): every head's out-of-fold numbers with their intervals
and the plots to read them by. Survival: the Kaplan–Meier curves of the low- and high-risk halves of the fused
out-of-fold risk with the log-rank p, and predicted against observed survival at the median event time.
Regression: predicted against true with the conformal interval. Every number is ``fit``'s, as read from
metrics.json; the scatter is oof.parquet's."""

from __future__ import annotations

import numpy as np

from histoembed.core import store
from histoembed.stages.report.html import esc, fig_img, figure, missing, section, table
from histoembed.stages.report.load import LoadedRun

TITLES = {"survival": "Survival (time to event)", "regression": "Regression"}


def _number(n: dict) -> list:
    return [n.get("value"), n.get("lo"), n.get("hi")]


def outcome_section(run: LoadedRun) -> str:
    metrics = run.metrics or {}
    task = metrics.get("task")
    if task not in TITLES:
        return section("outcome", "Survival or regression", missing("not a survival or regression run"))
    body = _survival(metrics) if task == "survival" else _regression(run, metrics)
    weights = ", ".join(f"{esc(h)} {w:.2f}" for h, w in metrics["fusion"]["weights"].items())
    body += (f"<p>Fusion: {esc(metrics['fusion']['rule'])}. Final weights: {weights}. Task from "
             f"{esc(metrics.get('task_from', ''))}; {len(metrics.get('skipped_rows', []))} row(s) of the data "
             "skipped (bad or missing values).</p>")
    return section("outcome", TITLES[task], body)


def _survival(metrics: dict) -> str:
    rows = []
    for head, m in metrics["heads"].items():
        auc = m["time_auc"]["at"]
        rows.append([head, *_number(m["harrell_c"]), *_number(m["uno_c"]),
                     *(a.get("value") for a in auc), m["risk_halves"]["logrank_p"]])
    times = metrics["heads"]["fused"]["time_auc"]["times"]
    header = ["head", "C-index", "lo", "hi", "Uno's C", "lo", "hi",
              *(f"AUC t={t:.3g}" for t in times), "log-rank p"]
    halves = metrics["heads"]["fused"]["risk_halves"]
    fig = figure(10, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    for name, color in (("low", "tab:blue"), ("high", "tab:red")):
        curve = halves.get(name)
        if curve:
            ax1.step([0, *curve["time"]], [1.0, *curve["survival"]], where="post", color=color,
                     label=f"{name} risk (n={halves['n_' + name]})")
    p = halves.get("logrank_p")
    ax1.set_title("Out-of-fold risk halves" + (f", log-rank p = {p:.2g}" if p is not None else ""))
    ax1.set_xlabel("time")
    ax1.set_ylabel("survival (Kaplan–Meier)")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=8)
    cal = metrics.get("survival_at_horizon") or {}
    groups = cal.get("groups") or []
    if groups:
        pred = [g.get("predicted") for g in groups]
        obs = [g.get("observed") for g in groups]
        ax2.plot([0, 1], [0, 1], color="gray", linestyle=":")
        ax2.plot(pred, obs, "o-", color="tab:purple")
        ax2.set_title(f"Survival at t = {cal['horizon']:.3g}: predicted vs Kaplan–Meier")
        ax2.set_xlabel("predicted (Breslow, other folds)")
        ax2.set_ylabel("observed")
        ax2.set_xlim(0, 1)
        ax2.set_ylim(0, 1)
    else:
        ax2.set_axis_off()
    return (f"<p>{metrics['images']} items, {metrics.get('events', '?')} events, {metrics['folds']} folds. A risk "
            "orders items by how soon the event comes (higher = earlier); a C-index of 0.5 is chance, and an "
            "interval holding 0.5 shows no ordering. Intervals: bootstrap 95 % over patients.</p>"
            + table(header, rows) + fig_img(fig, "Kaplan–Meier curves of the risk halves and calibration"))


def _regression(run: LoadedRun, metrics: dict) -> str:
    rows = [[head, *_number(m["r2"]), m["pearson_r"]["value"], m["spearman_r"]["value"], *_number(m["mae"])]
            for head, m in metrics["heads"].items()]
    conf = metrics.get("conformal") or {}
    text = (f"<p>{metrics['images']} items, {metrics['folds']} folds. R² below 0 predicts worse than the mean. "
            f"Conformal intervals (alpha {conf.get('alpha')}): coverage {conf.get('coverage', float('nan')):.3f} "
            f"against the target {conf.get('target_coverage', float('nan')):.2f}; for new items, prediction ± "
            f"{conf.get('half_width')}.</p>"
            + table(["head", "R²", "lo", "hi", "Pearson r", "Spearman r", "MAE", "lo", "hi"], rows))
    oof = run.outcome
    if oof is None or "prediction" not in oof.columns:
        return text + missing(f"no {store.OOF_FILE} with predictions to plot")
    fig = figure(5, 4.2)
    ax = fig.subplots()
    y, pred = oof["target"].to_numpy(), oof["prediction"].to_numpy()
    if "interval_low" in oof.columns:
        low, high = oof["interval_low"].to_numpy(), oof["interval_high"].to_numpy()
        finite = np.isfinite(low) & np.isfinite(high)
        ax.errorbar(y[finite], pred[finite], yerr=[pred[finite] - low[finite], high[finite] - pred[finite]],
                    fmt="none", ecolor="lightgray", zorder=1)
    ax.scatter(y, pred, s=12, color="tab:blue", zorder=2)
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", linestyle=":")
    ax.set_xlabel("true target")
    ax.set_ylabel("out-of-fold prediction (fused)")
    ax.set_title("Predicted vs true, with conformal intervals")
    return text + fig_img(fig, "predicted against true")
