"""Command line: a thin layer over the library; each command lives in its own module."""

from __future__ import annotations

from histoembed.cli import (
    compare,
    config,
    crops,
    demo,
    drift,
    embed,
    encoders,
    export,
    fit,
    import_,
    predict,
    qc,
    report,
    submit,
    synth,
)
from histoembed.cli.app import app

# Each module adds its command to `app` when imported.
COMMANDS = (qc, crops, embed, fit, submit, report, predict, drift, synth, demo, compare, export, import_, config,
            encoders)


def main() -> None:
    app()
