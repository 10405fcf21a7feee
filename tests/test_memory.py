"""core/memory.py: the fit's budget and a heap that gives freed blocks back (issue 37)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from histoembed.core import memory

# A child that frees 200 MiB of 4-MiB blocks while holding the last one, then prints how much of it the resident
# set gave back. A free of an 8-MiB mapped block first raises glibc's dynamic threshold above 4 MiB, as a fit's
# bags do, so without the fixed threshold the blocks come from the heap and stay resident below the one held.
CHILD = """
import sys
import numpy as np
from histoembed.core import memory
if sys.argv[1] == "fixed":
    assert memory.return_large_blocks()
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
first = np.ones(1 << 20)   # 8 MiB
del first
blocks = [np.ones(1 << 19) for _ in range(50)]   # 50 x 4 MiB
held = rss()
last = blocks[-1]
del blocks
print(held - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
def test_freed_blocks_go_back_to_the_system_with_the_fixed_threshold():
    def returned(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, check=True)
        return int(out.stdout)

    assert returned("fixed") >= 180           # of 196 MiB freed
    assert returned("dynamic") <= 20          # the control: glibc's default keeps them


def test_a_threshold_the_user_set_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.return_large_blocks() is False


def test_memory_budget_is_the_setting_or_half_the_machine():
    assert memory.memory_budget(2) == 2_000_000_000
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < memory.memory_budget(None) <= machine // 2
