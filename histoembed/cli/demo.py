"""`histoembed demo`: a synthetic dataset through every stage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from histoembed.cli.app import EncoderOpt, SeedOpt, command
from histoembed.core.config import Settings
from histoembed.core.settings_file import load_settings
from histoembed.core.console import console, table
from histoembed.tools.demo import DEMO_ENCODER, demo_settings, run_demo


@command("demo")
def demo(
    out: Annotated[Path, typer.Option(
        "--out", help="Folder for the demo: the generated data goes to OUT/data, every stage's output to OUT/run.")]
        = Path("demo"),
    train: Annotated[int, typer.Option("--train", min=8, help="Training images to generate.")] = 120,
    test: Annotated[int, typer.Option("--test", min=1, help="Test images to generate.")] = 40,
    encoder: EncoderOpt = None,
    seed: SeedOpt = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Settings file (TOML) to start from; default: the built-in defaults "
                         "(a histoembed.toml in the working folder is ignored, so the demo is the same anywhere).")]
        = None,
) -> None:
    """Generate a synthetic dataset and run qc, crops, embed, fit, submit and report on it."""
    seed = 0 if seed is None else seed
    settings = demo_settings(load_settings(config) if config else Settings(), encoder=encoder or DEMO_ENCODER, seed=seed)
    start = time.perf_counter()
    result = run_demo(out, n_train=train, n_test=test, seed=seed, settings=settings,
                      say=lambda msg: console.print(f"[bold]demo:[/] {msg}", soft_wrap=True))
    table("Demo stages", ["stage", "seconds"], [[k, v] for k, v in result.seconds.items()])
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s", soft_wrap=True)
    console.print(f"report:     {result.report}", soft_wrap=True)
    console.print(f"submission: {result.submission}", soft_wrap=True)
