"""`histoembed import`: TRIDENT, CLAM or STAMP feature files of a manifest's slides as a run's patches and
features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from histoembed.cli.app import DataOpt, RunOpt, VerifyDataOpt, command, setting
from histoembed.core.console import console
from histoembed.tools.import_features import run_import


def _listed(what: str, names: list[str]) -> None:
    if names:
        console.print(f"[yellow]{len(names)} {what}:[/] {escape(', '.join(names[:10]))}"
                      f"{' ...' if len(names) > 10 else ''}", soft_wrap=True)


@command("import")
def import_(
    folder: Annotated[Path, typer.Argument(
        file_okay=False, help="Folder of .h5 feature files, one per slide named by its stem (TRIDENT's "
                              "20x_256px_0px_overlap/features_<encoder>/, CLAM's h5_files/, STAMP's output).")],
    data: DataOpt = Path("manifest.csv"),
    run: RunOpt = Path("run"),
    encoder: Annotated[str | None, typer.Option(
        "--encoder", help="The encoder's name, when the files do not say it (no 'encoder' or 'extractor' "
                          "attribute, no features_<encoder> folder); it names the feature store.")] = None,
    patch_size: Annotated[int | None, typer.Option(
        "--patch-size", min=1, help="Pixels each patch was embedded at, when the files do not say it "
                                    "(CLAM's feature files).")] = None,
    slide_mpp: Annotated[float | None, setting("data.slide_mpp")] = None,
    verify_data: VerifyDataOpt = False,
) -> None:
    """Read a folder of TRIDENT, CLAM or STAMP feature files as the patches and features of a manifest's slides.

    Writes run/crops.parquet and run/features/<encoder>/, so `fit`, `submit`, `report` and `compare` work as
    after `crops` and `embed`.

    Files mixing encoders, dimensions or patch sizes are refused. Importing again with the same files does
    nothing; a changed file (or slide) is read again.
    """
    result = run_import(folder, data, run, encoder=encoder, patch_size=patch_size, slide_mpp=slide_mpp,
                        verify_data=verify_data)
    if result.skipped:
        console.print(f"{run / 'crops.parquet'} is up to date (same files, slides and options); nothing to do.",
                      soft_wrap=True)
    console.print(f"{result.patches} patches of {result.slides} slides from {folder} ({result.encoder}) in "
                  f"{run / 'crops.parquet'} and {result.store_dir}", soft_wrap=True)
    _listed("slide(s) without a feature file, left out", result.no_file)
    _listed("feature file(s) without a slide in the manifest, not read", result.no_slide)
