"""Terminal output: one stderr console, progress bars with rates (one switch), summary tables."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

console = Console(stderr=True, highlight=False)


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


_progress_on = False  # library calls (a notebook, a script) stay quiet; the command line turns bars on


def show_progress(on: bool = True) -> bool:
    """The one switch for every stage's progress bars (off until something turns it on; the CLI does).

    Returns the previous state, so a caller can put it back.
    """
    global _progress_on
    previous, _progress_on = _progress_on, on
    return previous


def progress(unit: str = "images") -> Progress:
    """A progress bar showing done/total, the rate in ``unit``/s, elapsed and remaining time (if switched on)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _Rate(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, refresh_per_second=4, disable=not _progress_on)


def table(title: str, columns: list[str], rows: list[list]) -> None:
    """Print a small table to the console."""
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r])
    console.print(t)


# ---------------------------------------------------------------- words for what is counted

def noun(images: int, slides: int, piece: bool = False, number: str = "") -> str:
    """The word for what the console counts, by what the inputs are: the one rule every count follows.

    Flat images are "image" and what is cut from them "crop"; whole slides are "slide" and their grid cells
    "patch"; both, joined by "or", when the inputs are mixed (``images``, ``slides``: how many of each kind,
    only whether each is 0 matters). ``piece``: the word for what is cut. ``number``: "" for one, "s" for
    several, "(s)" for either ("patch(es)").
    """
    pair = ("crop", "patch") if piece else ("image", "slide")
    words = [w for w, k in zip(pair, (images, slides)) if k] or [pair[0]]
    ending = {"": ("", ""), "s": ("s", "es"), "(s)": ("(s)", "(es)")}[number]
    return " or ".join(w + ending[w.endswith("ch")] for w in words)


def items(images: int, slides: int, crops: int | None = None, patches: int | None = None) -> str:
    """A count of inputs (and of what was cut from them) in :func:`noun`'s words, each kind on its own.

    ``items(4, 0)``: "4 images"; ``items(0, 16)``: "16 slides"; ``items(10, 2)``: "10 images and 2 slides";
    ``items(0, 16, 0, 4964)``: "4964 patches from 16 slides"; ``items(10, 2, 120, 300)``: "120 crops from 10
    images and 300 patches from 2 slides".
    """
    parts = []
    for n, cut, kind in ((images, crops, (1, 0)), (slides, patches, (0, 1))):
        if n or (kind == (1, 0) and not slides):
            head = "" if cut is None else f"{cut} {noun(*kind, piece=True, number='' if cut == 1 else 's')} from "
            parts.append(f"{head}{n} {noun(*kind, number='' if n == 1 else 's')}")
    return " and ".join(parts)
