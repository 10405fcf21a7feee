"""Bags read from the feature store when a head needs them (issue 37: cohorts larger than memory).

``BagSource`` reads the training images one after another once (``scan``): each bag's mean and its
float64 sums and sums of squares are kept (a few numbers per bag, never the rows), and the rows of
recent bags stay in a cache of bounded size. ``StoredBags`` is a ``Bags`` whose rows come from the
source: XGBoost and the linear probe read only the means, attention-MIL reads a bag when a batch
needs it (``bag_rows``), the MLP predicts over row chunks. The arithmetic is the in-memory ``Bags``'
own (each bag's rows in the same order, summed by the same ``reduceat``), so a fit gives the same
numbers either way. The MLP trains on every row of a fold at random: it gets them gathered (``X``,
the same numbers again) while they fit in ``gather_bytes``; past that it draws its minibatches from
runs of shuffled bags (``local_order``, ``rows_at``), each bag read once an epoch, which is a
different shuffle than in memory, so its numbers differ from an in-memory fit there (none fits).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from histoembed.core.errors import UserError
from histoembed.core.feature_store.bags import SlideIndex, SlideReader, SlideRows
from histoembed.models.heads.base import Bags


BAG_CACHE = 32 << 20         # the float32 rows of recently read bags
ROW_GROUP_CACHE = 16 << 20   # decoded row groups (several slides' pieces may share one)


def open_source(index: SlideIndex, image_ids: list[str], budget: int,
                left_out: dict[str, np.ndarray] | None = None) -> BagSource:
    """The bags of ``image_ids`` in a store, with caches of a fixed size whatever the cohort (memory stays flat
    as the store grows), and every row of a fold gathered only within half of ``budget``. ``left_out``: image_id
    -> the crops its bags leave out (``patch_flags.left_out_crops``: flagged slide patches)."""
    reader = SlideReader(index, cache_bytes=min(ROW_GROUP_CACHE, budget // 16))
    return BagSource(reader, image_ids, cache_bytes=min(BAG_CACHE, budget // 8), gather_bytes=budget // 2,
                     left_out=left_out)


def bag_sums(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 sum, float64 sum of squares) [D] of one bag's rows, exactly as ``Bags._bag_sums`` adds them."""
    block = rows.astype(np.float64)
    total = np.add.reduceat(block, [0], axis=0)[0]
    np.square(block, out=block)
    return total, np.add.reduceat(block, [0], axis=0)[0]


class BagSource:
    """The bags (image, view) of ``image_ids`` (in that order, views ascending), read through ``reader``."""

    def __init__(self, reader: SlideReader, image_ids: list[str], cache_bytes: int, gather_bytes: int,
                 left_out: dict[str, np.ndarray] | None = None):
        self.reader, self.image_ids, self.left_out = reader, list(image_ids), left_out or {}
        self.cache_bytes, self.gather_bytes = cache_bytes, gather_bytes
        self.dim = reader.index.dim
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._bag_of: dict[tuple[int, int], int] = {}

    def scan(self, check: Callable[[SlideRows], None] = lambda rows: None) -> None:
        """Read every image once: its bags, their sizes, means and sums (``check`` sees each image's rows first)."""
        image, view, size, means, sums, squares = [], [], [], [], [], []
        for i, image_id in enumerate(self.image_ids):
            rows = self.reader.read(image_id)
            check(rows)
            rows = self._used(rows)
            for v in np.unique(rows.view):
                bag = rows.embedding[rows.view == v]
                total, total_sq = bag_sums(bag)
                self._bag_of[(i, int(v))] = len(image)
                self._keep(len(image), bag)
                image.append(i)
                view.append(int(v))
                size.append(len(bag))
                sums.append(total)
                squares.append(total_sq)
                means.append((total / len(bag)).astype(np.float32))
        self.image = np.asarray(image, np.int64)
        self.view = np.asarray(view, np.int64)
        self.size = np.asarray(size, np.int64)
        self.means = np.asarray(means, np.float32).reshape(-1, self.dim)
        self.sums = np.asarray(sums, np.float64).reshape(-1, self.dim)
        self.squares = np.asarray(squares, np.float64).reshape(-1, self.dim)

    def _used(self, rows: SlideRows) -> SlideRows:
        """The image's rows without the crops it leaves out (checked whole before, as ``check_complete`` does)."""
        crops = self.left_out.get(rows.image_id)
        if crops is None:
            return rows
        use = ~np.isin(rows.crop_index, crops)
        return SlideRows(rows.image_id, rows.crop_index[use], rows.view[use], rows.embedding[use],
                         None if rows.crop_hash is None else rows.crop_hash[use])

    def _keep(self, bag: int, rows: np.ndarray) -> None:
        self._cache[bag] = rows
        self._cache.move_to_end(bag)
        while len(self._cache) > 1 and sum(r.nbytes for r in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)

    def rows(self, bag: int) -> np.ndarray:
        """Bag ``bag``'s rows [size, D] float32 (read with its image's other views, which are cached too)."""
        if bag in self._cache:
            self._cache.move_to_end(bag)
            return self._cache[bag]
        i = int(self.image[bag])
        slide = self._used(self.reader.read(self.image_ids[i]))
        wanted = None
        for v in np.unique(slide.view):
            rows = slide.embedding[slide.view == v]
            b = self._bag_of[(i, int(v))]
            if b == bag:
                wanted = rows
            else:
                self._keep(b, rows)
        self._keep(bag, wanted)
        return wanted

    def bags(self) -> StoredBags:
        """Every bag, as ``Bags.from_rows`` orders them (by image, then view)."""
        return StoredBags(self, np.arange(len(self.image)), np.arange(len(self.image)))


class StoredBags(Bags):
    """Bags ``bags`` of a ``BagSource`` (``index``: each one's position in the full set)."""

    def __init__(self, source: BagSource, bags: np.ndarray, index: np.ndarray):
        self.source, self.bags = source, np.asarray(bags, np.int64)
        sizes = source.size[self.bags]
        super().__init__(None, np.r_[0, np.cumsum(sizes)].astype(np.int64), source.image[self.bags],
                         source.view[self.bags], np.asarray(index, np.int64), np.zeros(0, np.int64),
                         source.means[self.bags])
        self._moments = (source.sums[self.bags], source.squares[self.bags])

    def __repr__(self) -> str:
        return f"StoredBags({self.n_bags} bags, {int(self.starts[-1])} rows x {self.dim}, read from the store)"

    @property
    def dim(self) -> int:
        return self.source.dim

    def fits_in_memory(self) -> bool:
        return int(self.starts[-1]) * self.dim * 4 <= self.source.gather_bytes

    def rows_at(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (positions among these bags' rows, any order) [n, D] float32, read bag by bag."""
        rows = np.asarray(rows, np.int64)
        bag = np.searchsorted(self.starts, rows, "right") - 1
        out = np.empty((len(rows), self.dim), np.float32)
        for b in np.unique(bag):
            mine = bag == b
            out[mine] = self.bag_rows(int(b))[rows[mine] - self.starts[b]]
        return out

    def local_order(self, gen) -> np.ndarray:
        """An epoch's order of the rows that reads each bag once: bags shuffled, taken in runs of at most half the
        bag cache, the rows of each run shuffled (the MLP's minibatches when a fold's rows do not fit in memory)."""
        import torch

        budget = max(1, self.source.cache_bytes // (2 * self.dim * 4))
        bags = torch.randperm(self.n_bags, generator=gen).numpy()
        order, run, held = [], [], 0
        for b in [*bags, None]:
            if b is None or (run and held + int(self.sizes[b]) > budget):
                rows = np.concatenate([np.arange(self.starts[r], self.starts[r + 1]) for r in run])
                order.append(rows[torch.randperm(len(rows), generator=gen).numpy()])
                run, held = [], 0
            if b is not None:
                run.append(int(b))
                held += int(self.sizes[b])
        return torch.from_numpy(np.concatenate(order)) if order else torch.zeros(0, dtype=torch.int64)

    @property
    def X(self) -> np.ndarray:
        """Every row of these bags in memory: only while they fit the budget (the MLP trains on rows at random)."""
        need = int(self.starts[-1]) * self.dim * 4
        if need > self.source.gather_bytes:
            raise UserError(f"a head needs every crop-view row of a fold in memory ({need / 2**30:.1f} GiB as "
                            f"float32), more than the fit's memory budget allows ({self.source.gather_bytes / 2**30:.1f}"
                            " GiB for rows)",
                            hint="fit the heads that stream bags (xgb, logreg, abmil), or raise [fit] memory_gb")
        out = np.empty((int(self.starts[-1]), self.dim), np.float32)
        for b in range(self.n_bags):
            out[self.starts[b]:self.starts[b + 1]] = self.bag_rows(b)
        return out

    def bag_rows(self, b: int) -> np.ndarray:
        return self.source.rows(int(self.bags[b]))

    def row_chunks(self, chunk: int):
        """Every row in order, ``chunk`` rows at a time, assembled from the bags as they are read."""
        buf, held = [], 0
        for b in range(self.n_bags):
            rows = self.bag_rows(b)
            while len(rows):
                take = rows[:chunk - held]
                buf.append(take)
                held += len(take)
                rows = rows[len(take):]
                if held == chunk:
                    yield np.concatenate(buf)
                    buf, held = [], 0
        if held:
            yield np.concatenate(buf)

    def select(self, images: np.ndarray) -> StoredBags:
        keep = np.isin(self.image, np.asarray(images))
        return StoredBags(self.source, self.bags[keep], self.index[keep])

    @property
    def row_bag(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_bags), self.sizes)
