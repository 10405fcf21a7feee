"""`histoembed compare`: the out-of-fold difference of two runs in a metric, with a paired interval over patients."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from histoembed.cli.app import SeedOpt, command
from histoembed.maths.metrics import DECISION_METRICS
from histoembed.tools.compare import LABELS, run_compare
from histoembed.core import store
from histoembed.core.console import console, table


@command("compare")
def compare(
    run_a: Annotated[Path, typer.Argument(help="The baseline run folder (with oof.parquet from `histoembed fit`).")],
    run_b: Annotated[Path, typer.Argument(help="The changed run folder, over the same training images.")],
    metric: Annotated[str, typer.Option(
        "--metric", help="What to compare: macro_f1, auroc, average_precision, balanced_accuracy, kappa (quadratic "
                         "weighted; needs the classes' order) or nll (lower is better).")] = "macro_f1",
    decision: Annotated[str, typer.Option(
        "--decision", help="Which out-of-fold decisions macro_f1, balanced_accuracy and kappa read: argmax (the "
                           "fused argmax) or offsets (argmax with the class offsets).")] = "argmax",
    class_order: Annotated[str | None, typer.Option(
        "--class-order", metavar="CLASS,CLASS", help="For kappa: the classes from the lowest grade up; without it, "
                                                     "the order RUN_A's fit recorded.")] = None,
    bootstrap: Annotated[int, typer.Option(
        "--bootstrap", min=1, help="Paired bootstrap resamples of the patients (images without patients).")] = 2000,
    seed: SeedOpt = None,
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Also write the comparison to this JSON file.")] = None,
) -> None:
    """Out-of-fold METRIC of RUN_B minus RUN_A, with a paired bootstrap 95% interval and per-fold differences.

    Both runs are scored on the same resampled patients each time. An interval that contains 0 means the runs
    cannot be told apart on these images.
    """
    order = [c.strip() for c in class_order.split(",")] if class_order else None
    r = run_compare(run_a, run_b, bootstrap=bootstrap, seed=seed or 0, decision=decision, metric=metric, order=order)
    name = LABELS[r.metric]
    rows = [[f["fold"], f["images"], f["a"], f["b"], f"{f['difference']:+.3f}"] for f in r.folds]
    table(f"Per fold of RUN_A ({r.images} images{', same folds in both runs' if r.same_folds else ''})",
          ["fold", "images", f"{name} A", f"{name} B", "B - A"], rows)
    lo, hi = r.interval
    better = (r.difference < 0) if r.lower_is_better else (r.difference > 0)
    if math.isnan(lo):
        verdict = "the interval is undefined (the metric is undefined on most resamples)"
    elif lo <= 0 <= hi:
        verdict = "the interval contains 0: no detectable difference"
    else:
        verdict = f"RUN_B is {'better' if better else 'worse'} beyond the bootstrap noise"
    drawn = f"{r.patients} patients" if r.unit == "patients" else f"{r.images} images"
    how = f" ({r.decision})" if r.metric in DECISION_METRICS else ""
    console.print(f"out-of-fold {name}{how}: A {r.value_a:.3f}, B {r.value_b:.3f}; "
                  f"B - A = {r.difference:+.3f}, paired bootstrap 95% interval [{lo:+.3f}, {hi:+.3f}] "
                  f"({r.bootstrap} resamples of the {drawn}"
                  f"{'; lower is better' if r.lower_is_better else ''}): {verdict}", soft_wrap=True)
    if json_out is not None:
        store.write_json(r.as_dict(), json_out)
        console.print(f"wrote {json_out}", soft_wrap=True)
