"""The memory a process may use, and a heap that gives freed blocks back (issue 37: cohorts larger than memory).

``memory_budget``: a fit's budget, ``[fit] memory_gb`` or half of what this machine (or the cgroup a
container or scheduler sets) has, which ``os.sysconf`` alone would not see.

``return_large_blocks``: glibc serves a large allocation with its own mapping and unmaps it when it is
freed, but each such free raises the threshold (up to 32 MiB), so later blocks of a few MiB (a slide's
bag of 2,000 x 1,024 float32 rows is 8 MiB; a padded attention-MIL step is tens) come from the heap,
whose freed holes are kept and fill up unevenly: the resident set creeps up over a long fit. Measured on
1,000 slides (``benchmarks/bench_fit_memory.py``): +220 MiB in attention-MIL's training alone, and the peak
grew with the cohort. A fixed threshold keeps every block of 1 MiB and more on its own mapping.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

M_MMAP_THRESHOLD = -3       # glibc's mallopt parameter (malloc.h); setting it also turns the dynamic threshold off
LARGE_BLOCK = 1 << 20


def memory_budget(memory_gb: float | None) -> int:
    """A budget in bytes: ``memory_gb``, else half of this machine's (or its cgroup's) memory."""
    if memory_gb is not None:
        return int(memory_gb * 1e9)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total // 2


def return_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Have glibc map blocks of ``threshold`` bytes and more on their own (see the module docstring).

    Leaves the heap alone where the user set ``MALLOC_MMAP_THRESHOLD_`` and where the C library is not glibc
    (macOS, musl); returns whether the setting took."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version    # glibc only: musl has a mallopt that ignores this parameter
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
