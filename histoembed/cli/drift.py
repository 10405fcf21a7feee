"""`histoembed drift`: do the test images look like the training images? (also run by `histoembed fit`)"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoembed.cli.app import ConfigOpt, RunOpt, command, setting, stage_settings
from histoembed.core.console import console, noun, table
from histoembed.inputs.provenance import run_kinds
from histoembed.stages.drift import DriftResult, run_drift


@command("drift")
def drift(
    run: RunOpt = Path("run"),
    config: ConfigOpt = None,
    encoder: Annotated[str | None, typer.Option(
        "--encoder", help="Which feature store under run/features to compare (needed when there are several).")] = None,
    folds: Annotated[int | None, setting("drift.folds")] = None,
    repeats: Annotated[int | None, setting("drift.repeats")] = None,
    pca_dims: Annotated[int | None, setting("drift.pca_dims")] = None,
    bootstrap: Annotated[int | None, setting("drift.bootstrap")] = None,
    seed: Annotated[int | None, setting("drift.seed")] = None,
    stain_crops: Annotated[int | None, setting("drift.stain_crops")] = None,
    include_flagged: Annotated[bool | None, setting("drift.include_flagged", "--include-flagged/--exclude-flagged")]
        = None,
) -> None:
    """Train-versus-test drift: a classifier two-sample test on the image embeddings, and each split's stain.

    Cross-validated AUC of "test or train?" with a bootstrap 95% interval (0.5: the splits cannot be told
    apart), and the haematoxylin and eosin densities of each split's crops. Writes run/drift.json, which
    the report shows. A shifted test set is why a cross-validated score can promise more than the test
    score gives.
    """
    settings = stage_settings(config, "drift", folds=folds, repeats=repeats, pca_dims=pca_dims, bootstrap=bootstrap, seed=seed,
                              stain_crops=stain_crops, include_flagged=include_flagged).drift
    show(run_drift(run, settings, encoder=encoder))


def show(result: DriftResult) -> None:
    """Print the drift check's stain table and finding (a warning when the splits differ)."""
    r = result.report
    if r["auc"] is None:
        console.print(f"drift: {r['finding']}", soft_wrap=True)
        return
    rows = [[stain, f"{r['stain']['train'][stain]['median']:.3f}", f"{r['stain']['test'][stain]['median']:.3f}",
             f"{r['stain_difference'][stain]:+.2f}"] for stain in r["stain_difference"]]
    kinds = run_kinds(result.path.parent)
    table(f"Stain density of the {noun(*kinds, piece=True, number='s')}' tissue (median per {noun(*kinds)}; "
          f"{r['images']['train']} training, {r['images']['test']} test {noun(*kinds, number='s')})",
          ["stain", "train", "test", "difference (SD)"], rows)
    style = "[yellow]warning:[/] " if r["shifted"] else ""
    console.print(f"{style}{r['finding']}", soft_wrap=True)
    if not result.skipped:
        console.print(f"wrote {result.path}", soft_wrap=True)
