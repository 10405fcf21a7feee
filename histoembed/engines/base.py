"""The engine interface, declared once: what ``local`` and ``ray`` each provide to the ``crops`` and ``embed`` stages.

An engine is a module with the three functions of :class:`Engine`; :func:`histoembed.engines.pick` gives the
one a stage's settings name. ``tests/test_ray_engine.py`` checks that both modules match it, parameter for
parameter.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from histoembed.core.feature_store import StorePlan

if TYPE_CHECKING:
    from histoembed.core.config import AugmentSettings, EmbedSettings
    from histoembed.models.encoders import Encoder
    from histoembed.models.precision import PrecisionCheck


@dataclass
class EmbedResult:
    """What one ``run_embed`` did to one encoder's store."""

    store_dir: Path
    encoder: str
    dim: int
    rows: int          # rows this shard holds now (new and resumed)
    new_rows: int      # rows embedded by this call
    skipped: bool      # True: everything was already embedded with these settings
    removed_parts: int  # parts of other settings that were removed
    seconds: float
    precision_check: PrecisionCheck | None = None
    stain_norm: str = "none"
    stain: dict | None = None  # feature_store.stain_summary of the store: crops normalised, passed through unchanged

    @classmethod
    def planned(cls, plan: StorePlan, encoder: str, dim: int, check: PrecisionCheck | None,
                stain_norm: str) -> EmbedResult:
        """The result before any crop is embedded: what ``feature_store.open_store`` found in the store."""
        return cls(plan.store_dir, encoder, dim, plan.rows, 0, not plan.todo, plan.removed_parts, 0.0, check,
                   stain_norm)


class Engine(Protocol):
    """Who runs the crops and embed stages' work. Both engines write the very same files."""

    def session(self, address: str | None) -> contextlib.AbstractContextManager[None]:
        """What the engine needs for a whole command (a Ray connection; nothing locally), entered once."""

    def map_ordered(self, fn: Callable[[Any], Any], items: Sequence, workers: int,
                    initializer: Callable[[], None] | None = None) -> contextlib.AbstractContextManager[Iterator]:
        """``fn`` of every item, in the items' order; ``initializer`` runs first in each process that calls
        ``fn``. ``workers``: processes of this machine (local); the cluster decides for Ray. Inside ``session``."""

    def run_embed(self, run: Path, settings: EmbedSettings, augment: AugmentSettings,
                  shard: tuple[int, int] = (0, 1), encoder: Encoder | None = None) -> EmbedResult:
        """Embed the shard's crops of ``run/crops.parquet`` into ``run/features/<encoder>/``; resume if interrupted."""


STOP_AFTER_ENV = "HISTOEMBED_TEST_STOP_AFTER_BATCHES"


def stop_for_tests(batches_done: int) -> None:
    """Test hook: ``HISTOEMBED_TEST_STOP_AFTER_BATCHES=N:SIGNAL`` sends this process SIGNAL after N batches.

    Interrupt tests stop the run at a fixed point this way, never by timing.
    """
    spec = os.environ.get(STOP_AFTER_ENV)
    if spec:
        n, sig = spec.split(":")
        if batches_done == int(n):
            os.kill(os.getpid(), getattr(signal, sig))
