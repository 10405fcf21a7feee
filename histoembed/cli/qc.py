"""`histoembed qc`: flag images and slides a classifier should not learn from, into run/qc.parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from histoembed.cli.app import ConfigOpt, DataOpt, RunOpt, StrictOpt, command, setting, stage_settings
from histoembed.core import config as cfg
from histoembed.core.console import console, items, noun, table
from histoembed.stages.qc import run_qc


@command("qc")
def qc(
    data: DataOpt = Path("data"),
    run: RunOpt = Path("run"),
    config: ConfigOpt = None,
    encoder: Annotated[str | None, setting("qc.encoder")] = None,
    embed: Annotated[bool, typer.Option(
        "--embed/--no-embed", help="Run the embedding pass (kNN outliers, near-duplicates by embedding) on "
                                   "thumbnails through --encoder. --no-embed: colour and hash checks only.")] = True,
    keep: Annotated[list[str] | None, typer.Option(
        "--keep", help="Un-flag this training image or slide (repeatable), e.g. --keep img_0042.png.")] = None,
    non_tissue_fraction: Annotated[float | None, setting("qc.non_tissue_fraction")] = None,
    ink_fraction: Annotated[float | None, setting("qc.ink_fraction")] = None,
    min_tissue_in_mask: Annotated[float | None, setting("qc.min_tissue_in_mask")] = None,
    outlier_z: Annotated[float | None, setting("qc.outlier_z")] = None,
    duplicate_cosine: Annotated[float | None, setting("qc.duplicate_cosine")] = None,
    hash_distance: Annotated[int | None, setting("qc.hash_distance")] = None,
    workers: Annotated[int | None, setting("qc.workers")] = None,
    strict: StrictOpt = False,
    max_pixels: Annotated[int | None, setting("data.max_pixels")] = None,
) -> None:
    """Flag non-tissue pictures, green ink, blank masks, embedding outliers and near-duplicates.

    Writes run/qc.parquet. crops and fit leave flagged training images and slides out (test
    items are always kept); images with ink are repaired when they are cropped. A whole slide is
    checked on its thumbnail.
    """
    settings = stage_settings(config, "qc", encoder=encoder, non_tissue_fraction=non_tissue_fraction,
                              ink_fraction=ink_fraction, min_tissue_in_mask=min_tissue_in_mask, outlier_z=outlier_z,
                              duplicate_cosine=duplicate_cosine, hash_distance=hash_distance, workers=workers)
    limit = cfg.override(settings.data, max_pixels=max_pixels).max_pixels
    result = run_qc(data, run, settings.qc, embed=embed, keep=list(keep or []), strict=strict, max_pixels=limit)
    if result.warning:
        console.print(f"[yellow]warning:[/] {escape(result.warning)}", soft_wrap=True)
    images, slides = result.kinds()
    one, several, either = (noun(images, slides, number=n) for n in ("", "s", "(s)"))
    if result.skipped:
        console.print(f"{result.path} is up to date (same {several} and settings); nothing to do.", soft_wrap=True)
    rows = [[flag, result.count(flag)] for flag in ("non_tissue", "ink", "blank", "outlier")]
    rows.append(["in a near-duplicate group", result.count("duplicate_group")])
    rows.append(["training mask twins (byte-identical mask files)", result.count("mask_twin")])
    rows.append([f"test {several} close to a training {one}", result.count("near_train")])
    rows.append(["flagged (left out of training)", result.count("flagged")])
    table(f"QC of {items(images, slides)}", ["flag", several], rows)
    flagged = result.flagged()
    if flagged:
        console.print(f"[bold]Flagged {several}[/] ({len(flagged)}):", soft_wrap=True)
        for image_id, split, reason in flagged:
            console.print(f"  {escape(image_id)} ({split}): {escape(reason)}", soft_wrap=True)
    twins = result.mask_twins()
    if twins:
        console.print(f"[bold]Training {several} sharing a mask file[/] ({len(twins)} pair(s); the one marked "
                      "non_tissue is flagged):", soft_wrap=True)
        for a, b in twins:
            console.print(f"  {escape(a)} = {escape(b)}", soft_wrap=True)
    leaks = result.near_train()
    if leaks:
        console.print(f"[yellow]possible leakage:[/] {len(leaks)} test {either} nearly duplicate a training {one} "
                      "(kept; see near_train in qc.parquet):", soft_wrap=True)
        for test_id, train_id, distance, cosine in leaks:
            cos = f", cosine {cosine:.3f}" if cosine is not None else ""
            console.print(f"  test {escape(test_id)} ~ train {escape(train_id)} (hash distance {distance}{cos})",
                          soft_wrap=True)
    if result.problems:
        unread = noun(images, slides or len(result.slide_keys), number="(s)")  # a slide may be the one unread
        console.print(f"[yellow]{len(result.problems)} {unread} could not be read or used and were skipped:[/]",
                      soft_wrap=True)
        for p in result.problems:
            console.print(f"  {escape(str(p))}", soft_wrap=True)
    console.print(f"embeddings: {escape(result.embedding)}", soft_wrap=True)
    if not result.skipped:
        console.print(f"wrote {result.path}", soft_wrap=True)
