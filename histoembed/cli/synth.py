"""`histoembed synth`: write a synthetic H&E dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoembed.cli.app import command
from histoembed.console import console
from histoembed.errors import UserError
from histoembed.synthetic import make_dataset


@command("synth")
def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the dataset into (reference layout).")]
        = Path("data"),
    train: Annotated[int, typer.Option("--train", min=1, help="Training images (labelled).")] = 40,
    test: Annotated[int, typer.Option("--test", min=0, help="Test images (unlabelled; ids continue after the training ids).")]
        = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every random choice; the same seed gives the same files.")]
        = 0,
    min_size: Annotated[int, typer.Option("--min-size", min=32, help="Smallest image side in pixels.")] = 256,
    max_size: Annotated[int, typer.Option("--max-size", min=32, help="Largest image side in pixels.")] = 512,
    outliers: Annotated[bool, typer.Option(
        "--outliers/--no-outliers",
        help="Plant a cartoon, a green-ink smear and an empty mask in the training split (listed in planted.json).")]
        = True,
) -> None:
    """Write a synthetic H&E dataset (images, tumour masks, labels) for trying the pipeline."""
    if min_size > max_size:
        raise UserError(f"--min-size {min_size} is larger than --max-size {max_size}")
    if outliers and train < 8:
        raise UserError(f"planting outliers needs at least 8 training images (got --train {train})",
                        hint="pass --train 8 or more, or --no-outliers")
    if (out / "train_data").exists() or (out / "test_data").exists():
        raise UserError("folder already holds a dataset", path=out,
                        hint="choose another --out, or remove the folder first")
    summary = make_dataset(out, train, test, seed, size_range=(min_size, max_size), outliers=outliers)
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    console.print(f"wrote {len(summary['train'])} training and {len(summary['test'])} test images to {out}")
    console.print(f"labels: {counts}")
    if summary["planted"]:
        planted = ", ".join(f"{k} ({v})" for k, v in summary["planted"].items())
        console.print(f"planted outliers: {planted}")
