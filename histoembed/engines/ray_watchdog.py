"""Ends what is left of a local Ray instance when the histoembed process that started it dies.

Ray ties its raylet and GCS to the driver (the kernel kills them with it), but its agents then
wait 60 s for the dead GCS before exiting, and workers may linger too. ``ray_session.session``
starts this small process (standard library only) beside a local instance; it waits for its
stdin to close. "done" first means the driver shut Ray down itself; end of file without it means
the driver died, so every process that has a file open in the instance's session folder and runs
Ray's code is killed. Linux only (it reads /proc).
"""

from __future__ import annotations

import os
import signal
import sys
import time


def session_processes(session_dir: str, ray_dir: str) -> list[int]:
    """Processes of this Ray instance: Ray's code (or a ``ray::`` title) with a file open in ``session_dir``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            rays = argv[0].startswith(b"ray::") or any(a.startswith(ray_dir.encode()) for a in argv[:3])
            if rays and any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(session_dir)
                            for fd in os.listdir(f"/proc/{pid}/fd")):
                found.append(int(pid))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def main(session_dir: str, ray_dir: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver
    if sys.stdin.read().strip() == "done":
        return
    for _ in range(3):  # a process spawned while the others went down is caught on the next pass
        for pid in session_processes(session_dir, ray_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.5)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
