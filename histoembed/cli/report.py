"""`histoembed report`: one self-contained HTML page of the run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoembed.cli.app import RunOpt, VerifyDataOpt, command
from histoembed.core import store
from histoembed.core.console import console
from histoembed.stages.report import write_report


@command("report")
def report(
    run: RunOpt = Path("run"),
    data: Annotated[Path | None, typer.Option(
        "--data", help="Data folder (or manifest CSV) for thumbnails, crops drawn on images and crop maps; "
                       "default: the one `histoembed crops` recorded in the run (if its files are unchanged), "
                       "else ./data when it exists, else those sections are left out.")] = None,
    verify_data: VerifyDataOpt = False,
) -> None:
    """Write run/report.html: one self-contained page with the run's tables and plots.

    Stops, as submit does, when the data changed since `histoembed crops` cut the run's crops.
    """
    if data is None and not (run / store.CROPS_FILE).exists() and Path("data").exists():
        data = Path("data")
    path = write_report(run, data, verify_data=verify_data)
    console.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB); open it in a browser", soft_wrap=True)
