"""Command line: a thin layer over the library; each command lives in its own module."""

from __future__ import annotations

import importlib

from histoembed.cli.app import app

# Each module adds its command to `app`; heavy imports happen inside the commands.
for _name in ("qc", "crops", "embed", "fit", "submit", "predict", "report", "demo", "synth"):
    try:
        importlib.import_module(f"histoembed.cli.{_name}")
    except ModuleNotFoundError as _e:  # a command still being written
        if _e.name != f"histoembed.cli.{_name}":
            raise


def main() -> None:
    app()
