"""`histoembed encoders`: list the named encoders and whether their weights are here."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from histoembed.cli.app import command
from histoembed.models.weights import encoder_rows


@command("encoders")
def encoders(
    all_: Annotated[bool, typer.Option(
        "--all", help="Also list the encoders that are refused (they need code from the hub or another package, or "
                      "ship pickled weights only), with the reason.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON instead of a table.")] = False,
) -> None:
    """List the named encoders: hub id, dimension, input size, pooling, licence, gating, and whether the weights are here.

    "here" means readable offline now: in a folder under $HISTOEMBED_MODELS (one subfolder
    per name), in the Hugging Face cache, or in the package. It never uses the network.
    """
    rows = encoder_rows(include_refused=all_)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    out = Console(highlight=False)
    table = Table(box=None, header_style="bold")
    for col in ("name", "hub id", "dim", "input", "pool", "licence", "gated", "weights"):
        table.add_column(col, justify="right" if col in ("dim", "input") else "left",
                         no_wrap=col in ("name", "hub id"))
    for row in rows:
        table.add_row(row["name"], row["hub_id"], str(row["dim"]), str(row["size"]), row["pool"], row["licence"],
                      "yes" if row["gated"] else "no", "refused" if row["refused"] else row["weights"] or "no")
    out.print(table)
    for row in rows:
        if row["refused"]:
            out.print(f"{row['name']} is refused: {row['refused']}", soft_wrap=True)
        if row.get("problem"):
            out.print(f"{row['name']}: weights broken: {row['problem']}", soft_wrap=True)
    out.print("weights: cache (Hugging Face cache), folder ($HISTOEMBED_MODELS/<name>), packaged, broken (a file "
              "that would not load, named above), or no: "
              "`histoembed embed --encoder NAME` then downloads them once (gated models need an accepted licence "
              "and `hf auth login`).", soft_wrap=True)
