"""The embed stage: every crop, in r views, through a frozen encoder into a Parquet store.

``run/features/<encoder-slug>/`` is the feature store; its contract (rows, views, metadata and key, parts,
resuming, what readers refuse) is :mod:`histoembed.core.feature_store`'s docstring. The engine that
``settings.engine`` names (:func:`histoembed.engines.pick`: ``local`` or ``ray``) does the work.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from histoembed import engines
from histoembed.core import feature_store, store
from histoembed.core.config import AugmentSettings, EmbedSettings
from histoembed.core.errors import UserError
from histoembed.engines.base import EmbedResult
from histoembed.engines.batches import check_slides_unchanged
from histoembed.inputs.provenance import run_data
from histoembed.models.encoders import Encoder


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r} is not i/n", hint="e.g. --shard 0/4 for the first of four") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < n", hint="shards count from 0: 0/4, 1/4, 2/4, 3/4")
    return i, n


def default_shard() -> tuple[int, int]:
    """Under torchrun (RANK, WORLD_SIZE set) each process takes its own shard; else the whole run."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else (0, 1)


def verify_data(run: Path) -> None:
    """Hash every image, mask and slide ``run/crops.parquet`` was cut from again, and stop naming each that
    changed (:class:`DataChanged`). Without it, ``embed`` checks only the slides it reads patches from, and
    trusts a slide whose size and modification time are those ``crops`` stamped (an in-place edit that keeps
    both, e.g. ``cp -p`` or ``rsync -t`` of another file of the same size, passes)."""
    run_data(Path(run), None, verify=True)
    check_slides_unchanged(Path(run) / store.CROPS_FILE, verify=True)


def run_embed(run: Path, settings: EmbedSettings, augment: AugmentSettings, shard: tuple[int, int] = (0, 1),
              encoder: Encoder | None = None, verify: bool = False) -> EmbedResult:
    """Embed this shard's crops of ``run/crops.parquet`` into ``run/features/<encoder>/``; resume if interrupted.

    ``settings.engine`` picks who does the work: ``local`` (:mod:`histoembed.engines.local`) or
    ``ray``, a Ray cluster (:mod:`histoembed.engines.ray`). ``verify``: :func:`verify_data` first.
    """
    if verify:
        verify_data(run)
    return engines.pick(settings.engine).run_embed(run, settings, augment, shard, encoder)


def encoder_names(text: str) -> list[str]:
    """The encoders of a comma list, in order, each once; two that would share a store folder are refused."""
    names = feature_store.encoder_list(text)
    if not names:
        raise UserError("no encoder given", hint="pass --encoder NAME (`histoembed encoders` lists them)")
    return names


def run_embeds(run: Path, settings: EmbedSettings, augment: AugmentSettings,
               shard: tuple[int, int] = (0, 1), verify: bool = False) -> list[EmbedResult]:
    """``run_embed`` for each encoder of ``settings.encoder`` (a comma list): the same crops and views, one store each.

    The augmented views depend only on (seed, image id, crop index, view), so every encoder
    sees the very same pixels, and their stores line up row for row. ``verify``: :func:`verify_data` first.
    """
    names = encoder_names(settings.encoder)
    if verify:
        verify_data(run)
    with engine_session(settings.engine, settings.ray_address):  # one Ray session for every encoder
        return [run_embed(run, settings.model_copy(update={"encoder": name}), augment, shard=shard) for name in names]


def engine_session(engine: str, ray_address: str | None) -> contextlib.AbstractContextManager:
    """What the engine needs for a whole command: a Ray connection for ``ray``, nothing for ``local``."""
    return engines.pick(engine).session(ray_address)


def read_store(run: Path, encoder: str | None = None, split: str | None = None) -> feature_store.Features:
    """Every embedding of the run's feature store (all shards) as one ``Features``."""
    return feature_store.read_features(feature_store.find_feature_store(run, encoder), split=split)
