"""How well the heads score out of fold (macro-F1, per fold and with its interval), the confusion matrix, and
whether the test set looks like the training set (drift). Every number is ``fit``'s or ``drift``'s, as read."""

from __future__ import annotations

import math

import numpy as np

from histoembed.core import store
from histoembed.models.drift import read_drift
from histoembed.stages.report.html import COLORS, esc, fig_img, figure, missing, section, table
from histoembed.stages.report.load import LoadedRun


def _scale_fusion_note(metrics: dict) -> str:
    """Which crop scales the heads saw and how (fit --scale-fusion), in words; nothing for scale-1 crops alone."""
    sf = metrics.get("scale_fusion") or {}
    crop_scales = sf.get("scales") or [1.0]
    if len(crop_scales) < 2 and sf.get("mode", "crops") == "crops":
        return ""
    return (f" Crop scales {', '.join(f'{s:g}' for s in crop_scales)} (crops --scales), scale fusion "
            f"<b>{esc(sf.get('mode', 'crops'))}</b>: {esc(sf.get('rule', ''))}.")


def scores_section(run: LoadedRun) -> str:
    title = "Cross-validated scores"
    heads = (run.metrics or {}).get("heads")
    if not heads:
        return section("scores", title, missing(f"no {store.METRICS_FILE} in the run (run `histoembed fit`)"))
    C = len(run.metrics.get("classes") or run.classes) or 1
    rows, per_fold = [], {}
    for head, m in heads.items():
        ci = m.get("macro_f1_ci") or [math.nan, math.nan]
        per_fold[head] = m.get("fold_macro_f1") or []
        rows.append([head, m["macro_f1"], float(ci[0]), float(ci[1]), m.get("fold_mean", math.nan),
                     m.get("fold_std", math.nan), m["accuracy"]])
    n_folds = max(len(v) for v in per_fold.values())
    fig = figure(10, 3.4)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.4, 1])
    width = 0.8 / len(per_fold)
    for j, (head, scores) in enumerate(per_fold.items()):
        ax1.bar(np.arange(len(scores)) + (j - (len(per_fold) - 1) / 2) * width, scores, width,
                label=head, color=COLORS.get(head))
    ax1.set_xticks(range(n_folds), [str(k) for k in range(n_folds)])
    ax1.set_xlabel("fold")
    ax1.set_ylabel("macro-F1 on the fold")
    ax1.set_ylim(0, 1)
    ax1.set_title("Per fold")
    ax1.legend(fontsize=8)
    for j, row in enumerate(rows):
        yerr = None if math.isnan(row[2]) else [[row[1] - row[2]], [row[3] - row[1]]]
        ax2.errorbar([j], [row[1]], yerr=yerr, fmt="o", capsize=6, color=COLORS.get(row[0]), markersize=8)
        ax2.text(j + 0.08, row[1], f"{row[1]:.3f}", va="center", fontsize=9)
    ax2.axhline(1.0 / C, color="gray", linestyle=":", label="chance-ish (1/C)")
    ax2.set_xticks(range(len(rows)), [row[0] for row in rows])
    ax2.set_xlim(-0.5, len(rows) - 0.3)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("out-of-fold macro-F1")
    ax2.set_title("Out of fold, bootstrap 95% interval")
    ax2.legend(fontsize=8, loc="lower right")
    body = ("<p>Every prediction here comes from a model (and a temperature and fusion weight) that never "
            f"saw the image: {run.metrics.get('images', '?')} training images, {n_folds} folds "
            f"(from {store.METRICS_FILE}).{_scale_fusion_note(run.metrics)}</p>"
            + table(["head", "OOF macro-F1", "CI low", "CI high", "fold mean", "fold std", "accuracy"], rows)
            + fig_img(fig, "per-fold and out-of-fold macro-F1") + field_html(run.metrics) + _encoders_html(run.metrics))
    return section("scores", title, body)


FIELD = (("auroc", "AUROC"), ("average_precision", "average precision"), ("balanced_accuracy", "balanced accuracy"),
         ("quadratic_kappa", "quadratic kappa"))


def _with_interval(number) -> str:
    if not isinstance(number, dict) or number.get("value") is None:
        return "-"
    ci = f" [{number['lo']:.3f}, {number['hi']:.3f}]" if number.get("lo") is not None else ""
    return f"{number['value']:.3f}{ci}"


def field_html(metrics: dict) -> str:
    """The numbers papers and benchmarks report (AUROC, AP, balanced accuracy, kappa), each with its interval over
    patients; the fit's selection metric; and the spread over repeated cross-validations."""
    heads = metrics.get("heads") or {}
    shown = [(k, name) for k, name in FIELD if any(k in m for m in heads.values())]
    if not shown:
        return ""
    iv = metrics.get("intervals") or {}
    drawn = (f"{iv.get('patients')} patients (the manifest's group)" if iv.get("unit") == "patients"
             else f"{iv.get('images', metrics.get('images', '?'))} images (the data has no patients)")
    positive = iv.get("positive_class")
    scope = (f"AUROC and average precision of {esc(positive)}" if positive else
             "AUROC and average precision one-vs-rest, the macro mean over classes")
    order = metrics.get("class_order")
    kappa = (f" Kappa over the grades {esc(' < '.join(order))}." if order else
             " No kappa: the classes have no order (set class_order or ordinal).")
    rows = [[head, *(_with_interval(m.get(k)) for k, _ in shown)] for head, m in heads.items()]
    out = (f"<h3>AUROC, balanced accuracy, kappa</h3><p>Out of fold, scikit-learn's values with 95% bootstrap "
           f"intervals over {iv.get('resamples', 0)} resamples of the {drawn}; {scope}.{kappa} Fusion weights chosen "
           f"by <b>{esc(metrics.get('select_by', 'macro_f1'))}</b>, class offsets by "
           f"<b>{esc((metrics.get('decision') or {}).get('offsets_compared_by', 'macro_f1'))}</b>.</p>"
           + table(["head", *(name for _, name in shown)], rows))
    repeats = ((metrics.get("seeds") or {}).get("metrics") or {}).get("fused")
    if repeats:
        names = dict(FIELD, macro_f1="macro-F1", accuracy="accuracy", nll="NLL")
        out += (f"<p>Repeated cross-validation ({metrics['seeds']['repeats']} seeds): the fused numbers' mean and "
                "spread over the repeats (how much they move with the fold assignment alone).</p>"
                + table(["fused", "mean", "std", "min", "max"],
                        [[names.get(k, k), *(float("nan") if v[s] is None else float(v[s])
                                            for s in ("mean", "std", "min", "max"))] for k, v in repeats.items()]))
    return out


def _encoders_html(metrics: dict) -> str:
    """fit --encoder A,B: every (encoder, head) member's out-of-fold score and final weight, and the fused score."""
    members, encoders = metrics.get("members"), metrics.get("encoders")
    if not encoders or not members or not isinstance(members[0], dict):
        return ""
    mode = metrics.get("encoder_fusion") or {}
    fused = (metrics.get("heads") or {}).get("fused", {}).get("macro_f1", math.nan)
    rows = [[m["member"], m["encoder"], m["head"], float(m["oof_macro_f1"]), float(m["weight"])] for m in members]
    rows.append(["fused", ", ".join(e["encoder"] for e in encoders), "", float(fused), 1.0])
    widths = ", ".join(f"{esc(e['encoder'])} ({e['dim']}-d)" for e in encoders)
    return (f"<h3>Encoders</h3><p>Fitted on {len(encoders)} encoders' features of the same crops and views: {widths}; "
            f"encoder fusion <b>{esc(mode.get('mode', 'logits'))}</b>: {esc(mode.get('rule', ''))}. Each member's "
            "out-of-fold macro-F1, its weight for the test set (chosen on all out-of-fold predictions) and the fused "
            "out-of-fold score:</p>"
            + table(["member", "encoder", "head", "OOF macro-F1", "weight"], rows))


def confusion_section(run: LoadedRun) -> str:
    title = "Confusion matrix and per-class F1"
    heads = (run.metrics or {}).get("heads") or {}
    if "fused" not in heads:
        return section("confusion", title, missing(f"no {store.METRICS_FILE} in the run"))
    classes = list(run.metrics.get("classes") or run.classes)
    C = len(classes)
    cm = np.asarray(heads["fused"]["confusion"])
    fig = figure(10, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    im = ax1.imshow(cm, cmap="Blues")
    for i in range(C):
        for j in range(C):
            ax1.text(j, i, str(cm[i, j]), ha="center", va="center",
                     color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax1.set_xticks(range(C), classes, rotation=25, ha="right")
    ax1.set_yticks(range(C), classes)
    ax1.set_xlabel("predicted")
    ax1.set_ylabel("true")
    ax1.set_title("Fused heads, out of fold")
    fig.colorbar(im, ax=ax1, shrink=0.8)
    width = 0.8 / len(heads)
    for j, (head, m) in enumerate(heads.items()):
        f1 = [m["per_class"][c]["f1"] for c in classes]
        ax2.bar(np.arange(C) + (j - (len(heads) - 1) / 2) * width, f1, width, label=head, color=COLORS.get(head))
    fused = heads["fused"]["per_class"]
    rows = [[c, fused[c]["precision"], fused[c]["recall"], fused[c]["f1"], fused[c]["support"]] for c in classes]
    ax2.set_xticks(range(C), classes, rotation=25, ha="right")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("F1")
    ax2.set_title("Per-class F1")
    ax2.legend(fontsize=8)
    body = fig_img(fig, "confusion matrix and per-class F1") + table(
        ["class (fused)", "precision", "recall", "F1", "images"], rows)
    return section("confusion", title, body)


def drift_section(run: LoadedRun) -> str:
    title = "Train versus test"
    d, why = read_drift(run.folder)
    if d is None:
        return section("drift", title, missing(why))
    if d["auc"] is None:
        return section("drift", title, f"<p>{esc(d['finding'])}</p>")
    lo, hi = d["auc_ci"]
    finding = f'<p class="warn"><b>Shifted test set.</b> {esc(d["finding"])}</p>' if d["shifted"] else \
        f"<p>{esc(d['finding'])}</p>"
    stains = [[s, *(f"{d['stain'][split][s]['median']:.3f} ({d['stain'][split][s]['q25']:.3f}-"
                    f"{d['stain'][split][s]['q75']:.3f})" for split in ("train", "test")),
               f"{d['stain_difference'][s]:+.2f}"] for s in d["stain_difference"]]
    body = (finding
            + table(["images train", "images test", "AUC test vs train", "CI low", "CI high"],
                     [[d["images"]["train"], d["images"]["test"], d["auc"], lo, hi]])
            + f"<p class='small'>Classifier two-sample test: {esc(d['classifier'])}; bootstrap interval over "
              f"images ({d['bootstrap']} resamples). 0.5 means the splits cannot be told apart.</p>"
            + table(["stain density of tissue", "train: median (IQR)", "test: median (IQR)",
                     "test - train (SD)"], stains))
    return section("drift", title, body)

