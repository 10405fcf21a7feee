"""`histoembed submit`: predict the test split into run/submission.csv."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoembed.cli.app import EncoderOpt, RunDataOpt, RunOpt, VerifyDataOpt, command
from histoembed.core.console import console, noun, table
from histoembed.inputs.provenance import run_kinds
from histoembed.stages.submit import run_submit


@command("submit")
def submit(
    data: RunDataOpt = None,
    run: RunOpt = Path("run"),
    encoder: EncoderOpt = None,
    tta: Annotated[bool, typer.Option(
        "--tta/--no-tta", help="Average over every embedded view of each test crop (--no-tta: the clean view only).")] = True,
    verify_data: VerifyDataOpt = False,
) -> None:
    """Predict the test split with the fold ensemble and write run/submission.csv."""
    result = run_submit(data, run, encoder=encoder, tta=tta, verify_data=verify_data)
    kinds = run_kinds(run, [f"test/{name}" for name in result.image_ids])
    outcome = result.classes in (["risk"], ["prediction"])   # survival or regression: one value per item
    if outcome:
        console.print(f"{result.classes[0]} of {result.n_images} test {noun(*kinds, number='(s)')} "
                      f"(sample_index,{result.classes[0]})", soft_wrap=True)
    else:
        table("Predicted labels", ["label", noun(*kinds, number="s")], [[c, n] for c, n in result.counts.items()])
    if result.fallbacks:
        lost = run_kinds(run, [f"test/{name}" for name in result.fallbacks])
        console.print(f"[yellow]{len(result.fallbacks)} test {noun(*lost, number='(s)')} had no usable "
                      f"{noun(*lost, piece=True)} and were predicted "
                      f"by {'the out-of-fold median' if outcome else 'the training-class prior'}:[/] "
                      f"{', '.join(result.fallbacks)}", soft_wrap=True)
    console.print(f"wrote {result.submission} ({result.n_images} rows) and {result.predictions}", soft_wrap=True)
