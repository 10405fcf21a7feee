"""The Typer app and the option types shared by every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="histoembed",
    help="Classify histology images with a frozen pathology foundation model.\n\n"
         "Run the stages in order in a folder that holds data/: qc, crops, embed, fit, submit. "
         "Each writes to run/ and skips work whose inputs and settings have not changed.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DataOpt = Annotated[Path, typer.Option(
    "--data", help="Data folder (reference layout: train_data/, test_data/, train_labels.csv) "
                   "or a manifest CSV with columns image,mask,label,split.")]
RunOpt = Annotated[Path, typer.Option("--run", help="Folder for every stage's outputs.")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="Settings file (TOML); default: ./histoembed.toml when it exists.")]
EncoderOpt = Annotated[str | None, typer.Option(
    "--encoder", help="Encoder: a registry name (`histoembed encoders` lists them: phikon-v2, uni2-h, "
                      "virchow2, ...), an hf-hub:org/name timm id, a Hugging Face transformers id or a local "
                      "model folder.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed of every random choice.")]
StrictOpt = Annotated[bool, typer.Option(
    "--strict", help="Stop on the first bad item instead of skipping it and listing it at the end.")]


def command(name: str | None = None, **kwargs):
    """Register a command whose user errors print one clear message (exit 2), never a traceback."""
    import functools

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            from rich.markup import escape

            from histoembed.console import console
            from histoembed.errors import UserError
            try:
                return fn(*args, **kw)
            except UserError as e:
                console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                console.print("[yellow]interrupted[/]: finished files are kept; "
                              "run the command again to resume.", soft_wrap=True)
                raise typer.Exit(130) from None

        app.command(name, **kwargs)(wrapper)
        return fn

    return decorate


def _print_version(value: bool) -> None:
    if value:
        from histoembed import __version__
        typer.echo(f"histoembed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    """Classify histology images with a frozen pathology foundation model."""
