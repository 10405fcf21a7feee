"""ROC and precision-recall curves of the fused out-of-fold probabilities, each with its pointwise band.

The curves are ``maths.curves.curve_bands`` of ``oof.parquet``'s fused probabilities (the ones ``fit``
scored): two classes, the second class's curve; more, one curve per class against the rest. The band
at each x is the 2.5th to 97.5th percentile of the curve over resamples of the patients (``oof.parquet``'s
``group``) or of the images when the data has no patients: read it at one x at a time. The areas
in the legend are the AUROC and average precision of metrics.json (scikit-learn's values), when present.
"""

from __future__ import annotations

import numpy as np

from histoembed.core import store
from histoembed.maths.curves import CURVE_RESAMPLES, curve_bands
from histoembed.stages.report.html import esc, fig_img, figure, missing, section
from histoembed.stages.report.load import LoadedRun

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
           "#64b5cd")


def _area(metrics: dict, kind: str, cls: str, binary: bool, band: dict) -> float | None:
    """metrics.json's fused AUROC (``roc``) or AP (``pr``) of ``cls``, else the band's own area."""
    fused = ((metrics or {}).get("heads") or {}).get("fused") or {}
    name = "auroc" if kind == "roc" else "average_precision"
    number = fused.get(name) if binary else (fused.get(f"{name}_per_class") or {}).get(cls)
    return number.get("value") if isinstance(number, dict) else band["area"]


def _draw(ax, kind: str, bands: dict, metrics: dict, binary: bool, prevalence: dict) -> None:
    for j, (cls, band) in enumerate(bands.items()):
        color = PALETTE[j % len(PALETTE)]
        x = np.asarray(band["x"], dtype=float)
        y, lo, hi = (np.array([np.nan if v is None else v for v in band[k]], dtype=float) for k in ("y", "lo", "hi"))
        area = _area(metrics, kind, cls, binary, band)
        label = f"{cls} ({'AUROC' if kind == 'roc' else 'AP'} {area:.3f})" if area is not None else cls
        ax.step(x, y, where="post" if kind == "roc" else "pre", color=color, label=label)
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, step="post" if kind == "roc" else "pre")
        if kind == "pr":
            ax.axhline(prevalence[cls], color=color, linestyle=":", linewidth=0.8)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false-positive rate" if kind == "roc" else "recall")
    ax.set_ylabel("true-positive rate" if kind == "roc" else "precision")
    ax.set_title("ROC" if kind == "roc" else "Precision-recall (dotted: each class's share)")
    ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")


def curves_section(run: LoadedRun) -> str:
    title = "ROC and precision-recall curves"
    oof = run.oof
    if oof is None or oof.prob is None:
        return section("curves", title, missing(f"no fused probabilities in {store.OOF_FILE} (run `histoembed fit`)"))
    classes = oof.classes
    groups = oof.groups
    bands = curve_bands(oof.y, oof.prob, classes, groups=groups, n=CURVE_RESAMPLES, seed=0)
    binary = len(classes) == 2
    prevalence = {c: float(np.mean(oof.y == k)) for k, c in enumerate(classes)}
    fig = figure(10, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    _draw(ax1, "roc", bands["roc"], run.metrics, binary, prevalence)
    _draw(ax2, "pr", bands["pr"], run.metrics, binary, prevalence)
    first = next(iter(bands["roc"].values()))
    unit = (f"{len(set(groups.tolist()))} patients (the manifest's group)" if first["unit"] == "patients"
            else f"{len(oof.y)} images (the data has no patients)")
    which = (f"the curve of {esc(classes[1])} (the positive class)" if binary else
             "one curve per class against the others (one-vs-rest)")
    body = (f"<p>The fused out-of-fold probabilities ({store.OOF_FILE}, each image scored by models, temperatures "
            f"and weights that never saw it): {which}. Shaded: the pointwise 95% band over {CURVE_RESAMPLES} "
            f"resamples of the {unit}; read it at one x at a time, it is not a band for the whole curve at once. "
            "The areas are metrics.json's AUROC and average precision.</p>"
            + fig_img(fig, "ROC and precision-recall curves of the fused out-of-fold probabilities"))
    return section("curves", title, body)
