"""Crops and slide patches read into batches: what the local engine's DataLoader workers and the Ray engine's
decode tasks run, so both embed the very same pixels.

``plan_batches`` cuts the crops still to embed into batches that never mix splits; ``CropBatches`` reads
them from ``crops.parquet`` (a PNG, or a whole slide's patch read from the slide) and hands back either
a batch or the problem of its first unreadable crop, which ``raise_batch_problem`` names.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from histoembed.core import store
from histoembed.core.console import noun
from histoembed.core.errors import UserError
from histoembed.core.feature_store import CropIndex
from histoembed.inputs import slides
from histoembed.inputs.pixels import decode_png
from histoembed.inputs.provenance import run_kinds


def plan_batches(rows: list[int], splits: list[str], batch_size: int) -> list[np.ndarray]:
    """Crop rows in batches that never mix splits, so each batch has one list of views."""
    out = []
    for split in ("train", "test"):
        mine = [r for r in rows if splits[r] == split]
        out += [np.array(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]
    return out


@dataclass(frozen=True)
class SlideProblem:
    """A slide patch that cannot be read, as a reader hands it back in place of a batch. Not a tuple: the
    DataLoader's ``default_convert`` turns tuples into lists on the way out, a dataclass it passes through."""

    path: str
    problem: str
    hint: str = ""


class CropBatches(torch.utils.data.IterableDataset):
    """Batches of decoded crops, read from crops.parquet row group by row group.

    Worker w of W takes batches w, w+W, ...; the DataLoader interleaves them back in order.
    Each item: (batch number, uint8 tensor [B, H, W, 3]), or (batch number, row) for a crop
    whose PNG cannot be decoded, or (batch number, ``SlideProblem``) for a slide patch that
    cannot be read. A whole slide's patch (no PNG; ``source``, ``level`` and the level-0 box in
    its row) is read from the slide as ``slides.read_patch`` reads it; a batch's neighbouring
    patches are cut from one region (``slides.read_patches``); each process opens each slide
    once (``SlideHandles``).
    """

    def __init__(self, path: Path, batches: list[np.ndarray]):
        self.path, self.batches = path, batches

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pf = pq.ParquetFile(self.path)
        # whole slides: a patch's pixels are read from its slide (one handle per slide in this process)
        slide_cols = ["png", "source", "level", "x0", "y0", "x1"] if "source" in pf.schema_arrow.names else None
        size = int((store.read_meta(self.path).get("settings") or {}).get("size", 224))
        handles = slides.process_handles()
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        cached: tuple[int, list] = (-1, [])
        for b in range(worker, len(self.batches), workers):
            items = []
            for row in self.batches[b]:
                group = int(np.searchsorted(starts, row, side="right")) - 1
                if cached[0] != group:
                    if slide_cols is None:
                        cached = (group, [(p,) for p in
                                          pf.read_row_group(group, columns=["png"])["png"].to_pylist()])
                    else:
                        t = pf.read_row_group(group, columns=slide_cols)
                        cached = (group, list(zip(*(t[c].to_pylist() for c in slide_cols))))
                items.append(cached[1][row - starts[group]])
            crops: list = [None] * len(items)
            runs, read = slide_runs(items), None
            for first, end in runs:  # neighbouring patches of a slide: read as regions, then cut
                _, source, level, _, _, _ = items[first]
                try:
                    read = slides.read_patches_at(source, handles, [(it[3], it[4]) for it in items[first:end]],
                                                  level, items[first][5] - items[first][3], size)
                except UserError as e:  # a damaged slide: named by the caller, never a worker's traceback
                    yield b, SlideProblem(str(e.path or source), e.problem, e.hint or "")
                    return
                crops[first:end] = list(read)
            for i, (row, item) in enumerate(zip(self.batches[b], items)):
                if crops[i] is not None:
                    continue
                try:
                    crops[i] = decode_png(item[0])
                except (ValueError, TypeError):
                    yield b, int(row)  # the caller names the bad crop
                    return
            # a batch of one slide's patches is one array already: no copy
            yield b, torch.from_numpy(read if runs == [(0, len(items))] else np.stack(crops))


def slide_runs(items: list[tuple]) -> list[tuple[int, int]]:
    """(first, end) of each run of consecutive slide patches (no PNG) of one slide, level and box side."""
    def key(item):
        return (item[1], item[2], item[5] - item[3]) if item[0] is None and len(item) > 1 and item[1] else None

    runs, first = [], 0
    for i in range(1, len(items) + 1):
        if i == len(items) or key(items[i]) != key(items[first]):
            if key(items[first]) is not None:
                runs.append((first, i))
            first = i
    return runs


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent: int, worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn`` (as ``partial(end_with_parent, os.getpid())``): the worker is
    killed the moment the process that started it dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, Linux).

    Without it a killed ``embed`` left its workers reading slides for up to five seconds, until the
    DataLoader's own watchdog noticed. A worker only reads crops, so nothing is lost by killing it. Elsewhere
    (macOS, Windows) the watchdog remains. A parent that died before the call is caught by its pid.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died between the fork and the prctl
        os._exit(1)


def raise_batch_problem(item, index: CropIndex | None) -> None:
    """Stop with a clear message when a batch came back as an unreadable crop or slide patch."""
    if isinstance(item, SlideProblem):
        raise UserError(item.problem, path=Path(item.path), hint=item.hint or None)
    if isinstance(item, int):
        raise UserError(f"crop {index.crop_index[item]} of {index.ids[item]} ({index.splits[item]}) is not a "
                        "readable PNG", path=index.path, hint="re-run `histoembed crops` (delete the file first)")


def check_slides_unchanged(crops_path: Path, verify: bool = False) -> None:
    """Stop when a slide the crops file reads patches from is gone or its bytes changed since `crops`.

    The slide's stamp recorded by crops (``content_stamps``) is trusted while its size and modification
    time are unchanged, as for images; otherwise (or with ``verify``) the slide is stamped again and compared.
    """
    if "source" not in pq.read_schema(crops_path).names:
        return
    cache = store.read_meta(crops_path).get("content_stamps") or {}
    sources = pq.read_table(crops_path, columns=["source"])["source"].unique().to_pylist()
    stamp = store.ContentStamps(None if verify else cache)
    for source in sources:
        if source is None:
            continue
        if not Path(source).exists():
            raise UserError("slide not found (it was cut by `histoembed crops`, then moved or deleted)",
                            path=Path(source), hint="put it back, or re-run `histoembed crops`")
        recorded = cache.get(str(Path(source).resolve()))
        if recorded is None or stamp(source) != recorded[2]:
            raise UserError("slide changed since `histoembed crops` cut its patches", path=Path(source),
                            hint="re-run `histoembed crops`, then `histoembed embed`")


def unit_of(crops_path: Path) -> str:
    """What the embed progress counts: crops, patches (a slide run) or both, in the console's words."""
    return noun(*run_kinds(Path(crops_path).parent), piece=True, number="s")
