"""The Typer app, the option types shared by every command, and settings options built from config.py."""

from __future__ import annotations

import functools
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from histoembed import __version__
from histoembed.core import config as cfg
from histoembed.core.console import console, show_progress
from histoembed.core.errors import UserError, from_os_error
from histoembed.stages import PIPELINE

app = typer.Typer(
    name="histoembed",
    help="Classify histology images and whole slides with a frozen pathology foundation model.\n\n"
         "Run the stages in order in a folder that holds data/: qc, crops, embed, fit, submit. "
         "Each writes to run/ and skips work whose inputs and settings have not changed.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DataOpt = Annotated[Path, typer.Option(
    "--data", help="Data folder (reference layout: train_data/, test_data/, train_labels.csv) "
                   "or a manifest CSV with columns image,mask,label,split (and group); an image may be a whole "
                   "slide (SVS, NDPI, MRXS, pyramidal TIFF, ...).")]
RunDataOpt = Annotated[Path | None, typer.Option(
    "--data", help="Data folder or manifest CSV; default: the one `histoembed crops` cut this run's crops from "
                   "(its files must be unchanged since).")]
RunOpt = Annotated[Path, typer.Option("--run", file_okay=False, help="Folder for every stage's outputs.")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="Settings file (TOML); default: ./histoembed.toml when it exists.")]
EncoderOpt = Annotated[str | None, typer.Option("--encoder", help=cfg.field_at("embed.encoder")[0].description)]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed of every random choice.")]
StrictOpt = Annotated[bool, typer.Option(
    "--strict", help="Stop on the first bad item instead of skipping it and listing it at the end.")]
VerifyDataOpt = Annotated[bool, typer.Option(
    "--verify-data", help="Hash every image (or slide) and mask again to check the data is unchanged, instead of "
                          "trusting stamps cached by file size and modification time (which miss an in-place edit "
                          "that keeps both, e.g. `cp -p`, `rsync -t`). Slower; use it before a final submission.")]

# `histoembed --help` lists the stages in pipeline order in one panel, then the tools beside the pipeline.
TOOLS = ("synth", "demo", "compare", "export", "import", "config", "encoders")
HELP_ORDER = (*PIPELINE, *TOOLS)

# The settings tables each stage reads (``histoembed config STAGE`` prints these).
STAGE_TABLES = {"qc": ("qc",), "crops": ("crops",), "embed": ("embed", "augment"), "fit": ("fit", "drift"),
                "drift": ("drift",)}


def setting_help(path: str) -> str:
    """The help of the option for the setting at ``path``: its description and default, from config.py."""
    field, model = cfg.field_at(path)
    title = model.model_config.get("title")
    default = "not set" if field.default is None else cfg.toml_value(field.default)
    return f"{title + ': ' if title else ''}{field.description} [default: {default}]"


def setting(path: str, flag: str | None = None, *aliases: str, **kwargs):
    """A typer Option for the setting at ``path`` (``crops.k``, ``fit.mlp.hidden``): help and default from config.py.

    The option's own default stays None (not given), so histoembed.toml still applies; ``flag`` defaults to
    the field's name (``--min-area``), and a bool setting gets ``--x/--no-x``; ``aliases`` are other names
    of the same option (``--repeats-cv`` for ``--seeds``).
    """
    field, _ = cfg.field_at(path)
    flag = flag or "--" + path.rsplit(".", 1)[1].replace("_", "-")
    if field.annotation in (bool, bool | None) and "/" not in flag:
        flag = f"{flag}/--no-{flag[2:]}"
    return typer.Option(flag, *aliases, help=escape(setting_help(path)), show_default=False, **kwargs)  # rich markup


class _Shown(Exception):
    """Raised by :func:`stage_settings` under ``histoembed config STAGE``: print these, do no work."""

    def __init__(self, settings: cfg.Settings, tables: tuple[str, ...]):
        super().__init__()
        self.settings, self.tables = settings, tables


_showing: ContextVar[bool] = ContextVar("showing", default=False)


def stage_settings(config: Path | None, stage: str, **options) -> cfg.Settings:
    """Every setting, with ``stage``'s table as resolved: defaults, then histoembed.toml (or --config), then options.

    ``options`` are the command's setting options (None: not given; a dict for a sub-table such as
    ``mlp``). Under ``histoembed config STAGE ...`` the command stops here and the settings are printed.
    """
    settings = cfg.load_settings(config)
    setattr(settings, stage, cfg.override(getattr(settings, stage), **options))
    if _showing.get():
        raise _Shown(settings, STAGE_TABLES[stage])
    return settings


def show_settings(stage: str, args: list[str]) -> str:
    """The TOML of ``stage``'s settings as ``histoembed STAGE *args`` would resolve them (nothing is run)."""
    if stage not in STAGE_TABLES:
        raise UserError(f"{stage!r} has no settings; stages with settings: {', '.join(STAGE_TABLES)}")
    token = _showing.set(True)
    try:
        code = typer.main.get_command(app).main([stage, *args], prog_name="histoembed", standalone_mode=False)
        if code:  # the stage refused its options and said why
            raise typer.Exit(code)
    except _Shown as shown:
        dump = shown.settings.model_dump()
        return cfg.to_toml({t: dump[t] for t in shown.tables})
    finally:
        _showing.reset(token)
    raise AssertionError(f"`histoembed {stage}` did not resolve its settings")  # every stage calls stage_settings


def command(name: str | None = None, **kwargs):
    """Register a command whose user errors print one clear message (exit 2), never a traceback.

    Help shows it in the "Stages" panel (pipeline order) or the "Tools" one, wherever its module is imported.
    """
    if name not in HELP_ORDER:
        raise ValueError(f"command {name!r} is neither a stage (stages.PIPELINE) nor one of the tools (TOOLS)")
    kwargs.setdefault("rich_help_panel", "Stages" if name in PIPELINE else "Tools")

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except UserError as e:
                console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
                raise typer.Exit(2) from None
            except OSError as e:  # full disk, read-only or missing folder: a message, not a traceback
                console.print(f"[bold red]error:[/] {escape(str(from_os_error(e)))}", soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                console.print("[yellow]interrupted[/]: finished files are kept; "
                              "run the command again to resume.", soft_wrap=True)
                raise typer.Exit(130) from None

        app.command(name, **kwargs)(wrapper)
        app.registered_commands.sort(key=lambda c: HELP_ORDER.index(c.name))  # help lists them in this order
        return fn

    return decorate


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"histoembed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(ctx: typer.Context,
          version: Annotated[bool, typer.Option(
              "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
          progress: Annotated[bool, typer.Option(
              "--progress/--no-progress", help="Progress bars on stderr while a stage works.")] = True) -> None:
    """Classify histology images and whole slides with a frozen pathology foundation model."""
    previous = show_progress(progress)
    ctx.call_on_close(lambda: show_progress(previous))  # in-process callers (tests, notebooks) get theirs back
