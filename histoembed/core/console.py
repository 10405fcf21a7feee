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
