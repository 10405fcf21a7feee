"""The run report: one self-contained HTML page with every plot inlined.

``write_report(run, data)`` reads what the stages left under ``run/`` (crops, QC flags,
out-of-fold predictions, metrics, calibration, the fitted models) and writes
``run/report.html``. Plots are drawn with matplotlib (Agg canvas, no display needed) and
embedded as base64 PNG, as are the thumbnails, so the file can be mailed or archived on
its own. A section whose inputs are missing says so instead of failing, so the report
can be written after any stage.

The report does no maths of its own: every number (macro-F1 and its interval, per-fold
scores, confusion matrix, per-class F1, ECE, NLL, fusion weights and the weight curve) is read
from ``metrics.json`` and ``calibration.json``; the reliability curves are
:func:`metrics.reliability` of :func:`decisions.calibrated_probabilities`, the probabilities ``fit`` scored;
the ROC and precision-recall curves are :func:`curves.curve_bands` of the fused out-of-fold probabilities;
the crop maps and the slides' attention are ``models.maps``'.

The package: ``load`` reads the run once, ``html`` holds the page's building blocks, and one
module per group of sections, in the page's order: ``data`` (run, dataset, QC, skipped items), ``crops``,
``scores`` (macro-F1 and the field's numbers, drift, confusion), ``curves`` (ROC and precision-recall with
their bands), ``calibration`` (calibration, fusion, decisions),
``maps`` (crop maps) and ``slides`` (whole slides).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from histoembed import __version__
from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.stages.report.calibration import calibration_section, decisions_section, fusion_section
from histoembed.stages.report.crops import crops_section
from histoembed.stages.report.curves import curves_section
from histoembed.stages.report.data import dataset_section, overview, qc_section, skipped_section
from histoembed.stages.report.html import CSS, esc
from histoembed.stages.report.load import load_run
from histoembed.stages.report.maps import maps_section
from histoembed.stages.report.scores import confusion_section, drift_section, scores_section
from histoembed.stages.report.slides import slides_section

# The page's sections in order (overview first, unlisted in the navigation): (anchor, link text, drawn by).
SECTIONS = ((None, None, overview), ("dataset", "Dataset", dataset_section), ("qc", "QC", qc_section),
            ("skipped", "Skipped", skipped_section), ("crops", "Crops", crops_section),
            ("scores", "Scores", scores_section), ("curves", "ROC / PR", curves_section),
            ("drift", "Drift", drift_section), ("confusion", "Confusion", confusion_section),
            ("calibration", "Calibration", calibration_section), ("fusion", "Fusion", fusion_section),
            ("decisions", "Decisions", decisions_section), ("maps", "Crop maps", maps_section),
            ("slides", "Whole slides", slides_section))


def render_report(run: Path, data: Path | None = None, verify_data: bool = False) -> str:
    """The report page as one HTML string; stops (:class:`DataChanged`) when the data changed since the crops."""
    loaded = load_run(Path(run), Path(data) if data is not None else None, verify_data)
    sections = [draw(loaded) for _, _, draw in SECTIONS]
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t, _ in SECTIONS if a is not None)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>histoembed report: {esc(loaded.folder)}</title><style>{CSS}</style></head><body>\n"
            f"<h1>histoembed report</h1><p class='small'>run <code>{esc(loaded.folder)}</code>"
            f"{' · data <code>' + esc(loaded.data) + '</code>' if loaded.data else ''} · {when} · "
            f"histoembed {__version__}</p><nav>{nav}</nav>\n" + "\n".join(sections) + "\n</body></html>\n")


def write_report(run: Path, data: Path | None = None, verify_data: bool = False) -> Path:
    """Write ``run/report.html`` (one self-contained file) and return its path.

    ``verify_data`` hashes every data file again instead of trusting stamps cached by size and time.
    """
    run = Path(run)
    if not run.is_dir():
        raise UserError("run folder not found", path=run, hint="pass the folder the stages wrote with --run")
    page = render_report(run, data, verify_data)
    out = run / store.REPORT_FILE
    with store.atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


__all__ = ["SECTIONS", "render_report", "write_report"]
