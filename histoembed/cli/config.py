"""`histoembed config [STAGE]`: the settings a stage would run with, as TOML ready to save."""

from __future__ import annotations

from typing import Annotated

import typer

from histoembed.cli.app import STAGE_TABLES, ConfigOpt, command, show_settings
from histoembed.core import settings_file
from histoembed.core.errors import UserError


@command("config", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def config(
    ctx: typer.Context,
    stage: Annotated[str | None, typer.Argument(
        help=f"One of {', '.join(STAGE_TABLES)}, followed by that stage's options; default: every table.",
        show_default=False)] = None,
    config: ConfigOpt = None,
) -> None:
    """Print the resolved settings (defaults, then histoembed.toml or --config, then options) as TOML.

    `histoembed config crops --k 5 > histoembed.toml` saves what `histoembed crops --k 5` would use.
    """
    if stage is None:
        if ctx.args:
            raise UserError(f"options {' '.join(ctx.args)} need a stage, e.g. histoembed config crops --k 5")
        typer.echo(settings_file.to_toml(settings_file.load_settings(config).model_dump()))
        return
    typer.echo(show_settings(stage, [*ctx.args, *(["--config", str(config)] if config else [])]))
