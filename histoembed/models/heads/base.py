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
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel

from histoembed.core import store
from histoembed.core.errors import UserError


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


@dataclass
class Bags:
    """Crop-view embeddings grouped by (image, view); the rows of a bag are contiguous."""

    X: np.ndarray            # [rows, D] float32
    starts: np.ndarray       # [bags + 1] row offset of each bag
    image: np.ndarray        # [bags] image index
    view: np.ndarray         # [bags] view number
    index: np.ndarray        # [bags] position of each bag in the full set (to place out-of-fold outputs)
    source_row: np.ndarray   # [rows] the input row each row came from
    _means: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_rows(cls, X: np.ndarray, row_image: np.ndarray, row_view: np.ndarray) -> Bags:
        """Group rows (any order) into bags sorted by (image, view)."""
        row_image = np.asarray(row_image, dtype=np.int64)
        row_view = np.asarray(row_view, dtype=np.int64)
        order = np.lexsort((row_view, row_image))
        img, view = row_image[order], row_view[order]
        new = np.r_[True, (img[1:] != img[:-1]) | (view[1:] != view[:-1])] if len(order) else np.zeros(0, bool)
        first = np.flatnonzero(new)
        return cls(np.ascontiguousarray(X[order], dtype=np.float32), np.r_[first, len(order)].astype(np.int64),
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
            if self.n_bags == 0:
                self._means = np.zeros((0, self.X.shape[1]), np.float32)
            else:
                sums = np.add.reduceat(self.X.astype(np.float64), self.starts[:-1], axis=0)
                self._means = (sums / self.sizes[:, None]).astype(np.float32)
        return self._means

    def select(self, images: np.ndarray) -> Bags:
        """The bags of the given image indices (a copy)."""
        keep = np.isin(self.image, np.asarray(images))
        rows = np.repeat(keep, self.sizes)
        sizes = self.sizes[keep]
        means = None if self._means is None else self._means[keep]
        return Bags(self.X[rows], np.r_[0, np.cumsum(sizes)].astype(np.int64), self.image[keep], self.view[keep],
                    self.index[keep], self.source_row[rows], means)

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """([bags, K, D] with zeros after each bag's rows, mask [bags, K]); K is the largest bag."""
        K = int(self.sizes.max()) if self.n_bags else 0
        out = np.zeros((self.n_bags, K, self.X.shape[1]), np.float32)
        mask = np.arange(K)[None, :] < self.sizes[:, None]
        out[mask] = self.X
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


class Head:
    """Base of every head: settings, seed, and saving/loading the parts every head has."""

    name: ClassVar[str]
    Settings: ClassVar[type[BaseModel]]
    description: ClassVar[str] = ""

    def __init__(self, settings: BaseModel | None = None, n_classes: int = 2, seed: int = 0):
        self.settings = settings if settings is not None else self.Settings()
        self.n_classes = n_classes
        self.seed = seed
        self.input_dim_: int | None = None
        self.classes_: list[str] | None = None

    # ------------------------------------------------------------ to implement
    def fit(self, bags: Bags, y: np.ndarray, stop: Bags, y_stop: np.ndarray) -> Head:
        raise NotImplementedError

    def predict(self, bags: Bags) -> np.ndarray:
        """Logits [bags, classes]."""
        raise NotImplementedError

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
                          "classes": list(classes), "seed": self.seed, **self.fitted_info()},
                         folder / self.info_file())

    @classmethod
    def load(cls, folder: Path) -> Head:
        folder = Path(folder)
        info = store.read_json(folder / cls.info_file(), f"{cls.name} head settings", hint="re-run `histoembed fit`")
        try:
            head = cls(cls.Settings.model_validate(info["settings"]), len(info["classes"]), int(info.get("seed", 0)))
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
