"""Who runs the ``crops`` and ``embed`` stages' work: ``local`` (this machine) or ``ray`` (a Ray cluster).

Both provide the interface :class:`~histoembed.engines.base.Engine` (``session``, ``map_ordered``,
``run_embed``); a stage asks :func:`pick` for the one its settings name and calls through it. Both write
the same files: the feature store through :mod:`histoembed.core.feature_store`, each batch read by
:mod:`histoembed.engines.batches` and sent through the encoder by :mod:`histoembed.engines.forward`.
Neither engine imports the other, and ``ray`` (the optional extra ``histoembed[ray]``) is imported only
when it is picked.
"""

from __future__ import annotations

from histoembed.engines import local
from histoembed.engines.base import Engine


def pick(name: str) -> Engine:
    """The engine called ``name`` (``local`` or ``ray``): a module that provides :class:`Engine`."""
    if name == "ray":
        from histoembed.engines import ray  # Ray: an optional extra, loaded only for this engine

        return ray
    return local
