"""`histoembed crops`: cut square tissue crops of images and lay patch grids on slides into run/crops.parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from histoembed.cli.app import ConfigOpt, DataOpt, RunOpt, StrictOpt, VerifyDataOpt, command, setting, stage_settings
from histoembed.core import config as cfg
from histoembed.core.config import Engine, MaskMode, Strategy
from histoembed.core.console import console, items, noun
from histoembed.core.errors import UserError
from histoembed.stages.crops import run_crops


def _parse_fill(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        rgb = tuple(int(p) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise UserError(f"--fill {text!r} is not R,G,B with three integers 0-255", hint="e.g. --fill 124,116,104")
    return rgb  # type: ignore[return-value]


def _parse_scales(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise UserError(f"--scales {text!r} is not a comma-separated list of numbers",
                        hint="e.g. --scales 1,2 (the crops as cut, and each with twice the context)") from None


def _parse_classes(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))


@command("crops")
def crops(
    data: DataOpt = Path("data"),
    run: RunOpt = Path("run"),
    config: ConfigOpt = None,
    strategy: Annotated[Strategy | None, setting("crops.strategy")] = None,
    k: Annotated[int | None, setting("crops.k")] = None,
    min_area: Annotated[int | None, setting("crops.min_area")] = None,
    margin: Annotated[float | None, setting("crops.margin")] = None,
    size: Annotated[int | None, setting("crops.size")] = None,
    fill: Annotated[str | None, setting("crops.fill", metavar="R,G,B")] = None,
    fill_outside_mask: Annotated[bool | None, setting("crops.fill_outside_mask")] = None,
    tile: Annotated[int | None, setting("crops.tile")] = None,
    min_tissue: Annotated[float | None, setting("crops.min_tissue")] = None,
    max_crops: Annotated[int | None, setting("crops.max_crops")] = None,
    mask_mode: Annotated[MaskMode | None, setting("crops.mask_mode")] = None,
    scales: Annotated[str | None, setting("crops.scales", metavar="S,S")] = None,
    mpp: Annotated[float | None, setting("crops.mpp")] = None,
    overlap: Annotated[float | None, setting("crops.overlap")] = None,
    max_patches: Annotated[int | None, setting("crops.max_patches")] = None,
    mask_classes: Annotated[str | None, setting("crops.mask_classes", metavar="CLASS,CLASS")] = None,
    thumb_mpp: Annotated[float | None, setting("crops.thumb_mpp")] = None,
    min_tissue_area: Annotated[float | None, setting("crops.min_tissue_area")] = None,
    score_patches: Annotated[bool | None, setting("crops.score_patches", "--score-patches/--no-score-patches")]
        = None,
    min_usable: Annotated[float | None, setting("crops.min_usable")] = None,
    slide_mpp: Annotated[float | None, setting("data.slide_mpp")] = None,
    force_slide_mpp: Annotated[bool | None, setting("data.force_slide_mpp")] = None,
    allow_upsample: Annotated[bool | None, setting("crops.allow_upsample")] = None,
    workers: Annotated[int | None, setting("crops.workers")] = None,
    engine: Annotated[Engine | None, setting("crops.engine")] = None,
    ray_address: Annotated[str | None, setting("crops.ray_address")] = None,
    strict: StrictOpt = False,
    max_pixels: Annotated[int | None, setting("data.max_pixels")] = None,
    keep: Annotated[list[str] | None, typer.Option(
        "--keep", help="Crop this QC-flagged training image or slide anyway (repeatable), e.g. --keep img_0042.png.")]
        = None,
    include_flagged: Annotated[bool, typer.Option(
        "--include-flagged", help="Crop every training image and slide, even those QC flagged.")] = False,
    verify_data: VerifyDataOpt = False,
) -> None:
    """Cut square tissue crops from the images of both splits (patches from whole slides) into run/crops.parquet.

    Whole slides (SVS, NDPI, MRXS, pyramidal TIFF, DICOM ... in a manifest) get patches as coordinates:
    a grid of --size px patches at --mpp microns per pixel over the tissue found on a thumbnail, pen ink and
    the scanner's border kept out; each patch is read and flagged for blur, ink, folds and background
    (fit and inference leave flagged patches out; see fit --keep-artifacts).

    With run/qc.parquet present, QC-flagged training images and slides are left out and green ink is
    repaired before cropping; test items are never left out. Stops when the images or slides changed
    since run/qc.parquet was written (run `histoembed qc` again).
    """
    settings = stage_settings(config, "crops", strategy=strategy, k=k, min_area=min_area, margin=margin,
                              size=size, fill=_parse_fill(fill), fill_outside_mask=fill_outside_mask, tile=tile,
                              min_tissue=min_tissue, max_crops=max_crops, mask_mode=mask_mode,
                              scales=_parse_scales(scales), mpp=mpp, overlap=overlap, max_patches=max_patches,
                              mask_classes=_parse_classes(mask_classes), thumb_mpp=thumb_mpp,
                              min_tissue_area=min_tissue_area, score_patches=score_patches, min_usable=min_usable,
                              workers=workers, engine=engine, allow_upsample=allow_upsample,
                              ray_address=ray_address)
    data_settings = cfg.override(settings.data, max_pixels=max_pixels, slide_mpp=slide_mpp,
                                 force_slide_mpp=force_slide_mpp)
    result = run_crops(data, run, settings.crops, strict=strict, keep=list(keep or []), include_flagged=include_flagged,
                       max_pixels=data_settings.max_pixels, verify_data=verify_data, slide_mpp=data_settings.slide_mpp,
                       force_slide_mpp=data_settings.force_slide_mpp)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
    if result.skipped:
        console.print(f"{result.path} is up to date (same inputs and settings); nothing to do.", soft_wrap=True)
    lo, median, hi = result.per_image
    images, slides = result.images - result.slides, result.slides
    scales = settings.crops.scales
    per_scale = f" ({len(scales)} scales: {', '.join(f'{s:g}' for s in scales)})" if len(scales) > 1 else ""
    console.print(f"{items(images, slides, result.crops - result.patches, result.patches)}{per_scale} in "
                  f"{result.path}; {noun(images, slides, piece=True, number='s')} per {noun(images, slides)}: "
                  f"min {lo}, median {median:g}, max {hi}", soft_wrap=True)
    if result.left_out:
        flagged_slides = sum(f"train/{name}" in result.slide_keys for name in result.left_out)
        console.print(f"left out {len(result.left_out)} training "
                      f"{noun(len(result.left_out) - flagged_slides, flagged_slides, number='(s)')} flagged by QC: "
                      f"{', '.join(result.left_out[:10])}{' ...' if len(result.left_out) > 10 else ''} "
                      "(--include-flagged or --keep ID to crop them)", soft_wrap=True)
    if result.repaired:
        console.print(f"repaired green ink in {len(result.repaired)} image(s) before cropping: "
                      f"{', '.join(f'{i} ({sp})' for sp, i in result.repaired[:10])}", soft_wrap=True)
    if result.fallbacks:
        console.print(f"{len(result.fallbacks)} image(s) fell back to grid crops over tissue found by colour:",
                      soft_wrap=True)
        for split, image_id, why in result.fallbacks:
            console.print(f"  {escape(image_id)} ({split}): {escape(why)}", soft_wrap=True)
    show_artifacts(result.artifacts)
    if result.problems:
        console.print(f"[yellow]skipped {len(result.problems)} item(s):[/]", soft_wrap=True)
        for p in result.problems:
            console.print(f"  {escape(str(p))}", soft_wrap=True)


SHOWN_SLIDES = 20   # slides listed one per line; the rest are counted (all are in crops.parquet)


def show_artifacts(per_slide: list[dict]) -> None:
    """The slides with flagged patches, one line each: how many of each cause, the usable share, pen ink."""
    flagged = [a for a in per_slide if any(a["flagged"].values()) or a.get("ink_on_thumbnail")]
    if not per_slide:
        return
    total = sum(a["patches"] for a in per_slide)
    causes = {k: sum(a["flagged"][k] for a in per_slide) for k in per_slide[0]["flagged"]}
    n_flagged = round(sum((1 - a["usable"]) * a["patches"] for a in per_slide))
    if not n_flagged and not flagged:
        console.print(f"artifacts: none of {total} patches flagged (blur, ink, fold, background)", soft_wrap=True)
        return
    console.print(f"artifacts: {n_flagged} of {total} patches flagged ("
                  + (", ".join(f"{k} {v}" for k, v in causes.items() if v) or "none") + f") on {len(flagged)} of "
                  f"{len(per_slide)} slides; fit and inference leave them out (fit --keep-artifacts keeps a kind)",
                  soft_wrap=True)
    for a in flagged[:SHOWN_SLIDES]:
        what = ", ".join(f"{k} {v}" for k, v in a["flagged"].items() if v) or "none flagged"
        ink = ", ".join(f"{k} {v:.1%}" for k, v in a.get("ink_on_thumbnail", {}).items())
        console.print(f"  {escape(a['image_id'])} ({a['split']}): {what} of {a['patches']} patches, "
                      f"{a['usable']:.0%} usable" + (f"; pen ink kept off the tissue: {ink}" if ink else ""),
                      soft_wrap=True)
    if len(flagged) > SHOWN_SLIDES:
        console.print(f"  ... and {len(flagged) - SHOWN_SLIDES} more slides (the flags column of crops.parquet)",
                      soft_wrap=True)
