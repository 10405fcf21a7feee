"""Command line: a thin layer over the library; each command lives in its own module."""

from __future__ import annotations

import importlib

from histoembed.cli.app import app

# Each module adds its command to `app`; heavy imports happen inside the commands.
for _name in ("qc", "crops", "embed", "fit", "submit", "predict", "report", "compare", "demo", "synth",
              "encoders"):
    importlib.import_module(f"histoembed.cli.{_name}")


def main() -> None:
    app()
