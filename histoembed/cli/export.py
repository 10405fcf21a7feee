"""`histoembed export`: a slide run's features (TRIDENT, STAMP) or tissue and patches (QuPath GeoJSON)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from histoembed.cli.app import EncoderOpt, RunOpt, command
from histoembed.core.console import console
from histoembed.core.errors import UserError
from histoembed.tools.export import describe, run_export
from histoembed.tools.export_geojson import export_geojson


class ExportFormat(str, Enum):
    trident = "trident"
    stamp = "stamp"
    geojson = "geojson"


@command("export")
def export(
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="Folder the files are written into.")],
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", help="trident: TRIDENT's HDF5 feature files (Patho-Bench reads them); stamp: STAMP's (tile "
                         "corners in micrometres); geojson: QuPath objects (tissue annotations, patch detections "
                         "with attention and probabilities).")] = ExportFormat.trident,
    run: RunOpt = Path("run"),
    view: Annotated[int, typer.Option(
        "--view", min=0, help="Which view of each patch's features (trident, stamp): 0 is the clean patch, "
                              "others its augmented copies.")] = 0,
    all_views: Annotated[bool, typer.Option(
        "--all-views", help="Every view the store holds (trident, stamp), each in OUT/view-<N>/.")] = False,
    encoder: EncoderOpt = None,
) -> None:
    """Write one file per slide of a run for other tools: TRIDENT or STAMP features, or QuPath GeoJSON.

    Files are written whole (under a temporary name, then renamed); an export run again rewrites only the
    slides whose files would change.
    """
    if fmt is ExportFormat.geojson:
        if all_views or view:
            raise UserError("--view and --all-views choose feature views; GeoJSON shows the clean view's attention",
                            hint="leave them out with --format geojson")
        result = export_geojson(run, out, encoder)
    else:
        result = run_export(run, fmt.value, out, None if all_views else view, encoder)
    for line in describe(result):
        console.print(escape(line), soft_wrap=True)
