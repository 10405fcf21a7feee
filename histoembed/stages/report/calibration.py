"""Calibration (reliability before and after temperature scaling), fusion weights, and the decisions on the
fused probabilities (class offsets, conformal sets, view spread), as ``fit`` chose and scored them."""

from __future__ import annotations

import math

import numpy as np

from histoembed.core import store
from histoembed.maths.metrics import reliability
from histoembed.models.heads.decisions import calibrated_probabilities
from histoembed.stages.report.html import esc, fig_img, figure, missing, section, table
from histoembed.stages.report.load import LoadedRun


def _fold_params(calibration: dict | None, folds: np.ndarray) -> list[dict] | None:
    """calibration.json's per-fold parameters when they cover every fold of ``folds``, else None."""
    entries = (calibration or {}).get("folds")
    if not isinstance(entries, list) or not entries:
        return None
    have = {int(e["fold"]) for e in entries if {"fold", "heads", "T", "weights"} <= set(e)}
    return entries if all(int(k) in have for k in np.unique(folds)) else None


def calibration_section(run: LoadedRun) -> str:
    title = "Calibration: reliability before and after temperature scaling"
    heads = (run.metrics or {}).get("heads")
    if run.oof is None or not run.oof.logits or not heads:
        return section("calibration", title, missing(f"{store.OOF_FILE} with the heads' logits and "
                                                       f"{store.METRICS_FILE}"))
    o = run.oof
    params = _fold_params(run.calibration, o.fold)
    if params is None or any(h not in o.logits for h in params[0]["heads"]):
        return section("calibration", title, missing(f"per-fold temperatures in {store.CALIBRATION_FILE}"))
    panels = calibrated_probabilities(o.logits, o.fold, params)
    fig = figure(3.6 * len(panels), 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    rows = []
    for ax, (name, (before, after)) in zip(axes, panels.items()):
        m = heads.get(name, {})
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
        for probs, label, suffix, color, marker in ((before, "before (T = 1)", "_before_calibration", "#dd8452", "s"),
                                                    (after, "after (fold T)", "", "#4c72b0", "o")):
            conf, acc, count = reliability(probs, o.y)
            ok = count > 0
            ece, nll = m.get(f"ece{suffix}", math.nan), m.get(f"nll{suffix}", math.nan)
            ax.plot(conf[ok], acc[ok], marker=marker, color=color, label=f"{label}, ECE {ece:.3f}")
            rows.append([name, label, ece, nll])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
        ax.set_title(name)
        ax.legend(fontsize=8, loc="upper left")
    temps = "; ".join(f"fold {p['fold']}: " + ", ".join(f"T_{h} {p['T'][h]:.2f}" for h in p["heads"]) for p in params)
    notes = (run.metrics or {}).get("calibration_notes") or []
    note_html = ("<p>Where T = 1 (the data could not support a temperature, or it did not lower the NLL of "
                 "images that did not choose it):</p><ul>"
                 + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>") if notes else \
        "<p class='small'>Every temperature was fitted (none fell back to T = 1).</p>"
    body = ("<p>The out-of-fold predictions as <code>fit</code> scored them: each fold's logits are divided by "
            "the temperature chosen on the other folds (cross-fitting), so the 'after' curves are honest. "
            "Temperatures are regularised (smoothed targets and a prior on log T), so separable held-out logits "
            "cannot drive T to zero, and one is applied only where it lowers the NLL of images that did not choose "
            f"it (a nested check). ECE and NLL are those of {store.METRICS_FILE}.</p>"
            + fig_img(fig, "reliability diagrams") + table(["head", "", "ECE", "NLL"], rows)
            + note_html + f"<p class='small'>{esc(temps)}</p>")
    return section("calibration", title, body)


SCORE_NAMES = {"macro_f1": "macro-F1", "auroc": "AUROC", "average_precision": "average precision",
               "balanced_accuracy": "balanced accuracy", "kappa": "quadratic kappa", "nll": "NLL (negated)"}


def fusion_section(run: LoadedRun) -> str:
    title = "Fusion weights"
    params = _fold_params(run.calibration, run.oof.fold) if run.oof is not None else None
    if params is None:
        return section("fusion", title, missing(f"per-fold fusion weights in {store.CALIBRATION_FILE}"))
    heads = params[0]["heads"]
    final = (run.calibration or {}).get("final") or {}
    rows = [[f"fold {p['fold']}"] + [float(p["weights"][h]) for h in heads] for p in params]
    if final.get("weights"):
        rows.append(["final (test set)"] + [float(final["weights"].get(h, math.nan)) for h in heads])
    weight_table = table(["chosen on", *heads], rows)
    rule = " + ".join(f"w_{h}·z_{h}/T_{h}" for h in heads)
    grid, curve = (run.calibration or {}).get("weight_grid"), final.get("macro_f1_by_w")
    metric = SCORE_NAMES.get(final.get("selected_by", "macro_f1"), final.get("selected_by"))  # fit --select-by
    if len(heads) != 2 or not grid or not curve:
        return section("fusion", title, f"<p>Fused logits <code>{esc(rule)}</code>, weights on the simplex, each "
                                        f"fold's chosen on the other folds for {esc(metric)}.</p>" + weight_table)
    a, b = heads
    fig = figure(7, 3.4)
    ax = fig.subplots()
    ax.plot(grid, curve, marker="o", color="#c44e52", label="all out-of-fold predictions")
    ax.axvline(final["weights"][a], color="black", linestyle="--", label=f"final w = {final['weights'][a]:.2f}")
    for w in sorted({float(p["weights"][a]) for p in params}):
        ax.axvline(w, color="gray", alpha=0.3, linewidth=3)
    ax.set_xlabel(f"w   (0: {b} only, 1: {a} only)")
    ax.set_ylabel(f"OOF {metric}")
    ax.set_title("Fusion weight")
    ax.legend(fontsize=8)
    body = (f"<p>Fused logits <code>{esc(rule)}</code> with the final temperatures: the {esc(metric)} of each weight "
            f"as <code>fit</code> scored it when it chose the final weight ({store.CALIBRATION_FILE}). The curve is "
            "drawn on all out-of-fold predictions, the same ones that chose the final weight, so its peak is "
            "optimistic; the per-fold weights (gray bands) were each chosen without the fold they were applied "
            "to.</p>" + fig_img(fig, "fusion weight curve") + weight_table)
    return section("fusion", title, body)


def decisions_section(run: LoadedRun) -> str:
    title = "Decisions: class offsets, conformal sets, view spread"
    m = run.metrics or {}
    if run.oof is None or "decision" not in m:
        return section("decisions", title, missing(f"{store.METRICS_FILE} from this version of `histoembed fit`"))
    o, d = run.oof, m["decision"]
    fmt_ci = lambda ci: f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-"  # noqa: E731
    offsets = (run.calibration or {}).get("final", {}).get("offsets")
    parts = [
        "<p>Per-class offsets on the fused log-probabilities, chosen for macro-F1 on the other folds; the plain "
        "argmax is always shown beside them.</p>",
        table(["decision", "OOF macro-F1", "95% CI", "used for the submission"],
               [["argmax", d["argmax"]["macro_f1"], fmt_ci(d["argmax"].get("macro_f1_ci")),
                 "yes" if d["submission_uses"] == "argmax" else "no"],
                ["argmax + class offsets", d["offsets"]["macro_f1"], fmt_ci(d["offsets"].get("macro_f1_ci")),
                 "yes" if d["submission_uses"] == "offsets" else "no"]]),
    ]
    if offsets:
        parts.append("<p class='small'>Final offsets (test set): "
                     + ", ".join(f"{esc(c)} {v:+.1f}" for c, v in zip(o.classes, offsets))
                     + f" (--offsets {esc(d['offsets_setting'])}).</p>")
    conf = m.get("conformal")
    if conf:
        per_class = [[c, "-" if v is None else v] for c, v in conf["coverage_per_class"].items()]
        parts.append(f"<p>Conformal prediction sets at alpha = {conf['alpha']} "
                     f"({'one threshold per class' if conf.get('class_conditional') else 'one threshold'}): "
                     f"out-of-fold coverage {conf['coverage']:.3f} (target {conf['target_coverage']:.2f}), "
                     f"mean set size {conf['mean_set_size']:.2f}, empty sets {conf['empty_sets']:.1%}.</p>"
                     + table(["true class", "coverage"], per_class))
    spread = (m.get("view_spread") or {}).get("accuracy_by_quantile")
    if spread:
        fig = figure(6, 3.0)
        ax = fig.subplots()
        ax.bar(range(len(spread)), [b["accuracy"] for b in spread], color="#4c72b0")
        ax.set_xticks(range(len(spread)), [f"{b['low']:.2f}-{b['high']:.2f}" for b in spread])
        ax.set_xlabel("view spread (quantile bin)")
        ax.set_ylabel("OOF accuracy")
        ax.set_ylim(0, 1)
        ax.set_title("Accuracy by view spread")
        parts.append("<p>View spread: how much an image's fused probabilities move between its augmented views "
                     "(mean total-variation distance from their mean). If accuracy falls as spread rises, a high "
                     "spread means 'check this one'.</p>" + fig_img(fig, "accuracy by view spread")
                     + table(["spread from", "to", "images", "accuracy"],
                              [[b["low"], b["high"], b["images"], b["accuracy"]] for b in spread]))
    return section("decisions", title, "\n".join(parts))

