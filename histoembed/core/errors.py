"""One error type for problems the user can fix; the CLI formats it in one place."""

from __future__ import annotations

import errno
from pathlib import Path


class UserError(Exception):
    """Bad input or a missing prerequisite: says which file, what is wrong and what to do."""

    def __init__(self, problem: str, path: str | Path | None = None, hint: str | None = None):
        self.problem = problem
        self.path = Path(path) if path is not None else None
        self.hint = hint
        super().__init__(str(self))

    def __reduce__(self):  # rebuilt with its parts when it crosses processes (a Ray task's error)
        return type(self), (self.problem, self.path, self.hint)

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        tail = f"\n  hint: {self.hint}" if self.hint else ""
        return f"{where}{self.problem}{tail}"


def from_os_error(e: OSError) -> UserError:
    """What the operating system refused (full disk, read-only folder, a file where a folder goes), in words."""
    path = e.filename if e.filename is not None else None
    text = str(e.strerror or e)
    code = e.errno
    if code == errno.ENOSPC or "No space left" in str(e):
        return UserError("no space left on the device", path=path,
                         hint="free some space (or choose another --run) and run the command again; "
                              "finished files are kept")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write or read here ({text})", path=path,
                         hint="choose a folder you may write to with --run (and read with --data)")
    if code in (errno.EEXIST, errno.ENOTDIR):
        return UserError(f"a file stands where a folder is needed ({text})", path=path,
                         hint="--run and --data take folders: pass a folder path, or move the file")
    if code == errno.EISDIR:
        return UserError(f"a folder stands where a file is needed ({text})", path=path)
    return UserError(f"the operating system refused: {text}", path=path)
