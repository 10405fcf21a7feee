"""One error type for problems the user can fix; the CLI formats it in one place."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input or a missing prerequisite: says which file, what is wrong and what to do."""

    def __init__(self, problem: str, path: str | Path | None = None, hint: str | None = None):
        self.problem = problem
        self.path = Path(path) if path is not None else None
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        tail = f"\n  hint: {self.hint}" if self.hint else ""
        return f"{where}{self.problem}{tail}"
