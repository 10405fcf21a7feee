"""Classify histology images with a frozen pathology foundation model."""

__version__ = "0.1.0"

import os  # noqa: E402

# OpenMP threads (torch's and XGBoost's libgomp) that wait for work sleep instead of spinning, unless the user
# chose otherwise. Spinning threads take CPU from everything else on the machine: on 2 shared CPUs, two
# `histoembed fit` at once took 244 s with spinning and 36 s without, one alone 84 s and 17.5 s
# (benchmarks/bench_threads.py, benchmarks/RESULTS.md). It must be set before torch or XGBoost loads, which is
# why it is here, at the package's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from histoembed.core.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
