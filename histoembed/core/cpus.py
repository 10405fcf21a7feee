"""How many CPU threads to use: the CPUs this process may use, not the machine's count.

A container or a job scheduler gives a process fewer CPUs than the machine has, through its
affinity mask or a cgroup CPU quota; ``os.cpu_count()`` sees neither. Thread pools sized to
the machine then oversubscribe the CPUs the process really has, and concurrent runs slow
each other down far more than in proportion. joblib's ``cpu_count`` reads both limits.
"""

from __future__ import annotations

from joblib import cpu_count

_threads: int | None = None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (at least 1)."""
    return max(1, int(cpu_count()))


def use_threads(requested: int = 0) -> int:
    """Size torch's thread pool (and the one ``threads()`` gives XGBoost) to ``requested`` (0: usable_cpus())."""
    import torch

    global _threads
    _threads = requested if requested > 0 else usable_cpus()
    torch.set_num_threads(_threads)
    return _threads


def threads() -> int:
    """The thread count set by ``use_threads``, else the CPUs this process may use."""
    return _threads or usable_cpus()
