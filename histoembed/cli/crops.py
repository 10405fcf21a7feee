from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoembed.cli.app import ConfigOpt, DataOpt, RunOpt, StrictOpt, command


def _parse_fill(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    from histoembed.errors import UserError
    parts = [p.strip() for p in text.split(",")]
    try:
        rgb = tuple(int(p) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise UserError(f"--fill {text!r} is not R,G,B with three integers 0-255", hint="e.g. --fill 124,116,104")
    return rgb  # type: ignore[return-value]


@command("crops")
def crops(
    data: DataOpt = Path("data"),
    run: RunOpt = Path("run"),
    config: ConfigOpt = None,
    strategy: Annotated[str | None, typer.Option(
        "--strategy", help="blobs: the largest mask components (reference recipe); grid: tiles over the whole "
                           "image; roi-window: tiles over each component's box; center: one crop per component.")]
        = None,
    k: Annotated[int | None, typer.Option("--k", help="Largest mask components kept per image (default 10).")] = None,
    min_area: Annotated[int | None, typer.Option(
        "--min-area", help="Smallest mask component kept, in source pixels (default 100).")] = None,
    margin: Annotated[float | None, typer.Option(
        "--margin", help="Each box edge moves out by this fraction of the box's width/height (default 0.1).")]
        = None,
    size: Annotated[int | None, typer.Option("--size", help="Side of the square crops written, pixels (default 224).")]
        = None,
    fill: Annotated[str | None, typer.Option(
        "--fill", metavar="R,G,B", help="Padding colour (default the ImageNet mean, 124,116,104).")] = None,
    fill_outside_mask: Annotated[bool | None, typer.Option(
        "--fill-outside-mask/--no-fill-outside-mask",
        help="Also paint the pixels outside the mask with the fill colour.")] = None,
    tile: Annotated[int | None, typer.Option(
        "--tile", help="Tile side in source pixels for grid, roi-window, center and fallbacks (0: same as --size).")]
        = None,
    min_tissue: Annotated[float | None, typer.Option(
        "--min-tissue", help="Grid tiles are kept when at least this fraction is tissue (default 0.5).")] = None,
    max_crops: Annotated[int | None, typer.Option(
        "--max-crops", help="At most this many tiles per image (grid, roi-window, fallback).")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="Worker processes (0: all cores; 1: in this process).")] = None,
    strict: StrictOpt = False,
    keep: Annotated[list[str] | None, typer.Option(
        "--keep", help="Crop this QC-flagged training image anyway (repeatable), e.g. --keep img_0042.png.")]
        = None,
    include_flagged: Annotated[bool, typer.Option(
        "--include-flagged", help="Crop every training image, even those QC flagged.")] = False,
) -> None:
    """Cut square tissue crops from both splits into run/crops.parquet.

    With run/qc.parquet present, QC-flagged training images are left out and green ink is
    repaired before cropping; test images are never left out.
    """
    from rich.markup import escape

    from histoembed import config as cfg
    from histoembed.console import console
    from histoembed.crops import run_crops

    settings = cfg.load_settings(config)
    crop_settings = cfg.updated(settings.crops, strategy=strategy, k=k, min_area=min_area, margin=margin, size=size,
                                fill=_parse_fill(fill), fill_outside_mask=fill_outside_mask, tile=tile,
                                min_tissue=min_tissue, max_crops=max_crops, workers=workers)
    result = run_crops(data, run, crop_settings, strict=strict, keep=list(keep or []), include_flagged=include_flagged)
    if result.skipped:
        console.print(f"{result.path} is up to date (same inputs and settings); nothing to do.", soft_wrap=True)
    lo, median, hi = result.per_image
    console.print(f"{result.crops} crops from {result.images} images in {result.path}; "
                  f"crops per image: min {lo}, median {median:g}, max {hi}", soft_wrap=True)
    if result.left_out:
        console.print(f"left out {len(result.left_out)} training image(s) flagged by QC: "
                      f"{', '.join(result.left_out[:10])}{' ...' if len(result.left_out) > 10 else ''} "
                      "(--include-flagged or --keep ID to crop them)", soft_wrap=True)
    if result.repaired:
        console.print(f"repaired green ink in {len(result.repaired)} image(s) before cropping: "
                      f"{', '.join(result.repaired[:10])}", soft_wrap=True)
    if result.fallbacks:
        console.print(f"{len(result.fallbacks)} image(s) fell back to grid crops over tissue found by colour:",
                      soft_wrap=True)
        for image_id, why in result.fallbacks:
            console.print(f"  {escape(image_id)}: {escape(why)}", soft_wrap=True)
    if result.problems:
        console.print(f"[yellow]skipped {len(result.problems)} item(s):[/]", soft_wrap=True)
        for p in result.problems:
            console.print(f"  {escape(str(p))}", soft_wrap=True)
