"""A lock file that holds its owner's process id: one ``embed`` per shard, one ``fit`` per run.

Portable (no ``fcntl``): the file is created with its content in one step (a hard link of a
finished temporary, which fails when the lock exists), so another process never reads an empty
lock. A lock whose process is gone (a killed run) is taken over; a live one is refused with its
process id, so the user can tell which run holds it.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from histoembed.core import store
from histoembed.core.errors import UserError


def holder(lock: Path) -> int | None:
    """The live process holding ``lock``, or None (no such file, or its process is gone)."""
    try:
        text = Path(lock).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() and store.pid_alive(int(text)) else None


def _create(lock: Path) -> bool:
    """Create ``lock`` holding our pid, atomically; False when it exists."""
    tmp = lock.with_name(f".{lock.name}.tmp-{os.getpid()}")  # not matched by a glob of the locks
    tmp.write_text(str(os.getpid()))
    try:
        try:
            os.link(tmp, lock)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: create empty, then write (a short window)
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(lock: Path) -> None:
    """Remove a dead process's ``lock``; leave it when a live process took it meanwhile."""
    aside = lock.with_name(f".{lock.name}.stale-{os.getpid()}")
    try:
        os.replace(lock, aside)  # of two processes taking over, only one gets the file
    except FileNotFoundError:
        return
    if holder(aside) is not None:  # a live process had just taken the lock: give it back
        with contextlib.suppress(OSError):
            os.link(aside, lock)
    aside.unlink(missing_ok=True)


@contextlib.contextmanager
def pid_lock(lock: Path, busy: Callable[[int], UserError]) -> Iterator[None]:
    """Hold ``lock`` for the block; ``busy(pid)`` is raised when a live process holds it."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    store.remove_stale(lock.parent, f".{glob.escape(lock.name)}.tmp-*")
    for _ in range(3):
        if _create(lock):
            break
        pid = holder(lock)
        if pid is not None:
            raise busy(pid)
        _take_over(lock)  # left by a killed run
    else:
        raise UserError("cannot take the lock", path=lock, hint="delete the file if no other histoembed is running")
    try:
        yield
    finally:
        if _mine(lock):  # never another's: a lock taken over while we ran is theirs
            lock.unlink(missing_ok=True)


def _mine(lock: Path) -> bool:
    """Whether ``lock`` still holds our own pid (``holder`` counts our own as gone)."""
    try:
        return lock.read_text().strip() == str(os.getpid())
    except OSError:
        return False
