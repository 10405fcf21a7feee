"""What every head shares: its input (bags of crop embeddings) and its contract.

**Bags.** An image is embedded as several crops, each in several views. A *bag* is one
(image, view): the crops of that image in that view. Every head reads bags and gives one
logit vector per bag; an image's logits are the mean over its bags (its views). This one
input serves every head: the MLP looks at each crop-view row, XGBoost and the linear probe
at each bag's mean, attention-MIL at each bag as a set, and the spread of an image's
per-view predictions comes for free.

**The contract** (scikit-learn's): ``Head(settings, n_classes, seed)``; ``fit(bags, y,
stop, y_stop)`` returns the head, with fitted attributes ending in ``_``; ``predict(bags)``
gives logits [bags, classes]; ``save(folder, classes)`` writes the head's own files
(safetensors, JSON, XGBoost UBJ: never pickle) and ``Head.load(folder)`` reads them back.
``stop`` is the caller's inner split for early stopping or model selection: a head never
sees the images it is evaluated on. Heads are registered in ``histoembed.models.heads.REGISTRY``.

**What a head can do beyond that**, it declares (class attributes), and callers ask the declaration,
never a head's name: ``gives_attention`` (``attention(bags)``: each row's weight within its bag, as
attention-MIL learns it) and ``scores_crops`` (``row_logits(X)``: logits of each crop-view row on its
own, as the MLP gives them). A head that reads only each bag's mean declares neither. ``tasks`` says what
it can be fitted to predict (``objectives``: classification, survival, regression); the fit asks it before
building a head with an ``objective``, which is saved with the head and read back by ``load``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel

from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.models.heads.objectives import Objective


def write_tensors(save_file: Callable, tensors: dict, path: Path) -> None:
    """Write a safetensors file atomically; a failure (a full disk) becomes an ``OSError`` naming ``path``.

    safetensors raises its own ``SafetensorError``, which names no file and is no ``OSError``,
    so the CLI would show a traceback rather than say which file and what to do.
    """
    from safetensors import SafetensorError

    with store.atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp))
        except SafetensorError as e:
            full = "code: 28" in str(e) or "No space left" in str(e) or "StorageFull" in str(e)
            raise OSError(errno.ENOSPC if full else errno.EIO,
                          "No space left on device" if full else f"cannot write ({e})", str(path)) from e


ROWS_PER_CHUNK = 1 << 16   # rows gathered, converted or summed at a time: temporaries stay small


def gather_rows(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``X[rows]`` as a new C-contiguous float32 array, gathered in chunks: a float16 store is converted
    chunk by chunk, so no float16 copy of the whole selection (nor a float64 one) is ever held."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), X.shape[1]), np.float32)
    for a in range(0, len(rows), ROWS_PER_CHUNK):
        out[a:a + ROWS_PER_CHUNK] = X[rows[a:a + ROWS_PER_CHUNK]]
    return out


class Bags:
    """Crop-view embeddings grouped by (image, view); the rows of a bag are contiguous.

    ``X`` [rows, D] float32; ``starts`` [bags + 1] row offset of each bag; ``image`` [bags] image index;
    ``view`` [bags] view number; ``index`` [bags] position of each bag in the full set (to place
    out-of-fold outputs); ``source_row`` [rows] the input row each row came from.

    A subset (``select``) takes its rows of ``X`` only when ``X`` is first read: heads that read only
    the bags' means (XGBoost, the linear probe) never copy the rows of a fold, which matters when an
    image is a slide of thousands of patches.
    """

    def __init__(self, X: np.ndarray, starts: np.ndarray, image: np.ndarray, view: np.ndarray, index: np.ndarray,
                 source_row: np.ndarray, _means: np.ndarray | None = None, _rows: np.ndarray | None = None):
        self._X, self._rows = X, _rows      # _rows: this subset's rows of _X, gathered on first use of .X
        self.starts, self.image, self.view, self.index, self.source_row = starts, image, view, index, source_row
        self._means = _means
        self._moments: tuple[np.ndarray, np.ndarray] | None = None

    def __repr__(self) -> str:
        return f"Bags({self.n_bags} bags, {len(self.source_row)} rows x {self.dim})"

    @property
    def X(self) -> np.ndarray:
        if self._rows is not None:
            self._X, self._rows = gather_rows(self._X, self._rows), None
        return self._X

    @X.setter
    def X(self, value: np.ndarray) -> None:
        self._X, self._rows = value, None

    @property
    def dim(self) -> int:
        return int(self._X.shape[1])

    @classmethod
    def from_rows(cls, X: np.ndarray, row_image: np.ndarray, row_view: np.ndarray) -> Bags:
        """Group rows (any order; float32 or float16) into bags sorted by (image, view), as float32."""
        row_image = np.asarray(row_image, dtype=np.int64)
        row_view = np.asarray(row_view, dtype=np.int64)
        order = np.lexsort((row_view, row_image))
        img, view = row_image[order], row_view[order]
        new = np.r_[True, (img[1:] != img[:-1]) | (view[1:] != view[:-1])] if len(order) else np.zeros(0, bool)
        first = np.flatnonzero(new)
        return cls(gather_rows(X, order), np.r_[first, len(order)].astype(np.int64),
                   img[first], view[first], np.arange(len(first)), order)

    @property
    def n_bags(self) -> int:
        return len(self.image)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)

    @property
    def row_bag(self) -> np.ndarray:
        """Bag (0..n_bags-1) of each row."""
        return np.repeat(np.arange(self.n_bags), self.sizes)

    def means(self) -> np.ndarray:
        """[bags, D] float32: each bag's mean embedding (XGBoost's and the linear probe's samples)."""
        if self._means is None:
            self._bag_sums()
        return self._means

    def _bag_sums(self) -> None:
        """Each bag's float64 sum and sum of squares, and its mean, in one pass over the rows.

        Summed a block of whole bags at a time (``reduceat``: each bag's rows in order, whatever the
        block), so a store read bag by bag (``StoredBags``) gives the very same numbers."""
        X = self.X
        means = np.zeros((self.n_bags, self.dim), np.float32)
        sums = np.zeros((self.n_bags, self.dim), np.float64)
        squares = np.zeros((self.n_bags, self.dim), np.float64)
        sizes, b = self.sizes, 0
        while b < self.n_bags:
            e = max(b + 1, int(np.searchsorted(self.starts, self.starts[b] + ROWS_PER_CHUNK, "right")) - 1)
            e = min(e, self.n_bags)
            block = X[self.starts[b]:self.starts[e]].astype(np.float64)
            sums[b:e] = np.add.reduceat(block, self.starts[b:e] - self.starts[b], axis=0)
            np.square(block, out=block)
            squares[b:e] = np.add.reduceat(block, self.starts[b:e] - self.starts[b], axis=0)
            means[b:e] = (sums[b:e] / sizes[b:e, None]).astype(np.float32)
            b = e
        if self._means is None:
            self._means = means
        self._moments = (sums, squares)

    def bag_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """([bags, D] float64 sums, [bags, D] float64 sums of squares) of each bag's rows."""
        if self._moments is None:
            self._bag_sums()
        return self._moments

    def row_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, unbiased std) float32 [D] over every row, from the bags' sums (added in bag order): the
        heads' input standardisation, the same whether the rows are in memory or read from the store."""
        sums, squares = self.bag_moments()
        n = int(self.sizes.sum())
        total, total_sq = sums.sum(axis=0), squares.sum(axis=0)
        mean = total / max(n, 1)
        var = np.maximum(total_sq - total * mean, 0.0) / max(n - 1, 1)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)

    def fits_in_memory(self) -> bool:
        """Whether ``X`` (every row at once) may be taken: always here; ``StoredBags`` within its budget."""
        return True

    def bag_rows(self, b: int) -> np.ndarray:
        """The rows [size, D] float32 of bag ``b``."""
        return self.X[self.starts[b]:self.starts[b + 1]]

    def row_chunks(self, chunk: int):
        """Every row in order, ``chunk`` rows at a time (the last chunk shorter)."""
        for a in range(0, int(self.starts[-1]) if self.n_bags else 0, chunk):
            yield self.X[a:a + chunk]

    def select(self, images: np.ndarray) -> Bags:
        """The bags of the given image indices (their rows are copied when ``X`` is first read)."""
        keep = np.isin(self.image, np.asarray(images))
        rows = np.flatnonzero(np.repeat(keep, self.sizes))
        sizes = self.sizes[keep]
        means = None if self._means is None else self._means[keep]
        parent_rows = rows if self._rows is None else self._rows[rows]
        out = Bags(self._X, np.r_[0, np.cumsum(sizes)].astype(np.int64), self.image[keep], self.view[keep],
                   self.index[keep], self.source_row[rows], means, parent_rows)
        if self._moments is not None:
            out._moments = (self._moments[0][keep], self._moments[1][keep])
        return out

    def padded(self, bags: np.ndarray | None = None, K: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """([n, K, D] with zeros after each bag's rows, mask [n, K]) of ``bags`` (indices; default all);
        K is the largest bag of the whole set unless given."""
        sizes = self.sizes
        K = (int(sizes.max()) if self.n_bags else 0) if K is None else K
        if bags is None:
            out = np.zeros((self.n_bags, K, self.dim), np.float32)
            mask = np.arange(K)[None, :] < sizes[:, None]
            out[mask] = self.X
            return out, mask
        bags = np.asarray(bags, dtype=np.int64)
        mask = np.arange(K)[None, :] < sizes[bags, None]
        out = np.zeros((len(bags), K, self.dim), np.float32)
        for j, b in enumerate(bags):
            out[j, :sizes[b]] = self.bag_rows(b)
        return out, mask

    def images(self) -> np.ndarray:
        """The image indices present, sorted."""
        return np.unique(self.image)

    def per_image(self, values: np.ndarray) -> np.ndarray:
        """Mean of per-bag ``values`` over each image's bags, in ``images()`` order."""
        _, inverse, counts = np.unique(self.image, return_inverse=True, return_counts=True)
        values = np.asarray(values, dtype=np.float64)
        sums = np.zeros((len(counts), values.shape[1]))
        np.add.at(sums, inverse, values)
        return sums / counts[:, None]

    def image_labels(self, y_bags: np.ndarray) -> np.ndarray:
        """One label per image (``images()`` order) from per-bag labels."""
        _, first = np.unique(self.image, return_index=True)
        return np.asarray(y_bags)[first]


CAPABILITIES = ("gives_attention", "scores_crops")   # what a head may declare beyond the contract


class Head:
    """Base of every head: settings, seed, and saving/loading the parts every head has."""

    name: ClassVar[str]
    Settings: ClassVar[type[BaseModel]]
    description: ClassVar[str] = ""
    gives_attention: ClassVar[bool] = False   # implements attention(bags)
    scores_crops: ClassVar[bool] = False      # implements row_logits(X)
    tasks: ClassVar[tuple[str, ...]] = ("classification",)   # what it can be fitted to predict (objectives.TASKS)

    def __init__(self, settings: BaseModel | None = None, n_classes: int = 2, seed: int = 0,
                 objective: Objective | None = None):
        self.settings = settings if settings is not None else self.Settings()
        self.objective = objective or Objective()
        self.n_classes = 1 if self.objective.outcome else n_classes
        self.seed = seed
        self.input_dim_: int | None = None
        self.classes_: list[str] | None = None

    # ------------------------------------------------------------ to implement
    def fit(self, bags: Bags, y: np.ndarray, stop: Bags, y_stop: np.ndarray) -> Head:
        raise NotImplementedError

    def predict(self, bags: Bags) -> np.ndarray:
        """Logits [bags, classes]."""
        raise NotImplementedError

    def attention(self, bags: Bags) -> np.ndarray:
        """Weight of each row of ``bags`` within its bag (each bag's weights sum to 1); heads that
        declare ``gives_attention``."""
        raise NotImplementedError(f"the {self.name} head gives no attention over a bag")

    def row_logits(self, X: np.ndarray) -> np.ndarray:
        """Logits [rows, classes] of each crop-view row on its own; heads that declare ``scores_crops``."""
        raise NotImplementedError(f"the {self.name} head does not score single crops")

    def fitted_info(self) -> dict:
        """Fitted numbers worth keeping in the JSON file (best epoch, chosen C, ...)."""
        return {}

    def _save_arrays(self, folder: Path) -> None:
        raise NotImplementedError

    def _load_arrays(self, folder: Path, info: dict) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ shared
    @classmethod
    def info_file(cls) -> str:
        return f"{cls.name}.json"

    def save(self, folder: Path, classes: list[str]) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_arrays(folder)
        store.write_json({"head": self.name, "settings": self.settings.model_dump(), "input_dim": self.input_dim_,
                          "classes": list(classes), "seed": self.seed, **self.fitted_info(),
                          **(self.objective.record() if self.objective.outcome else {})},
                         folder / self.info_file())

    @classmethod
    def load(cls, folder: Path) -> Head:
        folder = Path(folder)
        info = store.read_json(folder / cls.info_file(), f"{cls.name} head settings", hint="re-run `histoembed fit`")
        try:
            head = cls(cls.Settings.model_validate(info["settings"]), len(info["classes"]), int(info.get("seed", 0)),
                       Objective.of(info))
            head.input_dim_, head.classes_ = int(info["input_dim"]), list(info["classes"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the head's settings file is incomplete ({e})", path=folder / cls.info_file(),
                            hint="re-run `histoembed fit`") from None
        head._load_arrays(folder, info)
        return head

    @staticmethod
    def _require(path: Path) -> Path:
        if not path.exists():
            raise UserError("model file missing", path=path, hint="re-run `histoembed fit`")
        return path
