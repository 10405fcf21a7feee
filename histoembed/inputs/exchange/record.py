"""What one feature file holds once read, whatever tool wrote it, and the checks every reader and writer shares.

TRIDENT, CLAM and STAMP each store a slide's patch features in one HDF5 file, with the patches' places in
their own units and attributes. Reading any of them gives one ``FeatureFile``: the features, the patches as
level-0 boxes, the patch side in level-0 pixels, the encoder's name and, where the file says, the scale the
patches were embedded at. Writing takes the features, the level-0 boxes and one ``Patching``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from histoembed.core.errors import UserError
from histoembed.core.store import atomic_path

# TRIDENT's convention between magnification and resolution: M x is 10 / M microns per pixel (20x = 0.5 um/px).
MICRONS_AT_1X = 10.0


def magnification(mpp: float) -> float:
    """The magnification TRIDENT writes for ``mpp`` microns per pixel."""
    return MICRONS_AT_1X / float(mpp)


def plain_number(x: float) -> int | float:
    """``x`` as an int when it is one (20.0 -> 20), for attributes and folder names other tools parse."""
    r = round(float(x))
    return int(r) if abs(float(x) - r) < 1e-6 else round(float(x), 6)


@dataclass(frozen=True)
class Patching:
    """How one slide's patches were cut: what TRIDENT and STAMP write beside the features."""

    slide: str                    # the slide's file stem: the feature file is named after it
    patch_size: int               # patch side in pixels as embedded
    mpp: float                    # microns per pixel as embedded
    level0_mpp: float             # the slide's microns per level-0 pixel
    level0_size: tuple[int, int]  # the slide's (width, height) in level-0 pixels
    overlap: int = 0              # pixels two neighbouring patches share, at the embedding scale
    objective_power: float | None = None  # the scanner's objective, when the slide says; else 10 / level0_mpp

    @property
    def magnification(self) -> int | float:
        return plain_number(magnification(self.mpp))

    @property
    def level0_magnification(self) -> int | float:
        return plain_number(self.objective_power or magnification(self.level0_mpp))


@dataclass(frozen=True)
class FeatureFile:
    """One slide's patch features as read from a TRIDENT, CLAM or STAMP file."""

    path: Path
    kind: str                     # "trident", "clam" (patching attributes or none) or "stamp"
    slide: str                    # the slide's name: the file's stem
    encoder: str | None           # the encoder's name as the caller gave it, else as the file or folder says
    encoder_in_file: str | None   # the name the file (or its features_<encoder> folder) says, if any
    dim: int                      # feature dimension
    boxes: np.ndarray             # (N, 4) int64 level-0 x0, y0, x1, y1 of every patch, in the file's order
    patch_size_level0: int        # patch side in level-0 pixels
    patch_size: int | None        # patch side in pixels as embedded (None: the file does not say)
    mpp: float | None             # microns per pixel as embedded (None: the file does not say)
    level0_mpp: float | None      # the slide's microns per level-0 pixel, when the file says
    level0_size: tuple[int, int] | None  # the slide's level-0 (width, height), when the file says
    overlap: int = 0              # pixels neighbouring patches share at the embedding scale
    inferred: str | None = None   # what was not in the file and was worked out instead (said in messages)
    features: np.ndarray | None = None  # (N, dim) float32; None when read without features

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def magnification(self) -> float | None:
        return magnification(self.mpp) if self.mpp else None

    def describe_patching(self) -> str:
        if self.patch_size and self.mpp:
            return f"{self.patch_size} px at {self.mpp:.3g} um/px"
        return f"{self.patch_size_level0} level-0 px"


# ---------------------------------------------------------------- attributes

def text(value) -> str | None:
    """An HDF5 attribute as text (h5py gives bytes or numpy strings for fixed-length ones); TRIDENT's 'None'
    is None."""
    if value is None:
        return None
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode("utf-8", "replace")
    value = str(value)
    return None if value in ("None", "") else value


def number(value, path: Path, name: str) -> float | None:
    """An HDF5 attribute as a finite number (None when absent); anything else is a UserError naming the file."""
    if value is None or text(value) is None:
        return None
    try:
        x = float(np.asarray(value).reshape(-1)[0]) if not isinstance(value, (bytes, str)) else float(text(value))
    except (TypeError, ValueError, IndexError):
        raise UserError(f"attribute {name!r} is {value!r}, not a number", path=path) from None
    if not np.isfinite(x) or x < 0:
        raise UserError(f"attribute {name!r} is {x}, not a positive number", path=path)
    return x


# ---------------------------------------------------------------- checks

def check_coords(coords: np.ndarray, path: Path, what: str = "coords") -> np.ndarray:
    """A (N, 2) array of finite corners, N > 0 (UserError naming the file)."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise UserError(f"dataset {what!r} has shape {coords.shape}, not (N, 2)", path=path)
    if not len(coords):
        raise UserError("the file holds no patch", path=path, hint="leave the slide out, or extract it again")
    if not np.issubdtype(coords.dtype, np.number) or not np.isfinite(coords).all():
        raise UserError(f"dataset {what!r} holds values that are not finite numbers", path=path)
    return coords


def check_feature_shape(dims: tuple[int, ...], n: int, path: Path, what: str) -> int:
    """The dimension of a (patches, D) dataset with one row per patch (UserError naming the file)."""
    if len(dims) != 2:
        raise UserError(f"dataset {what!r} has shape {dims}, not (patches, dimension)", path=path,
                        hint="slide- or patient-level features (one vector per file) cannot be imported as patches")
    if dims[0] != n:
        raise UserError(f"dataset {what!r} has {dims[0]} rows but 'coords' has {n}", path=path,
                        hint="the file is damaged or was written by two runs; extract it again")
    return int(dims[1])


def check_features(features: np.ndarray, n: int, path: Path, what: str) -> np.ndarray:
    """(N, D) finite float32 features, one row per patch (UserError naming the file)."""
    check_feature_shape(tuple(features.shape), n, path, what)
    if not np.issubdtype(features.dtype, np.number):
        raise UserError(f"dataset {what!r} holds {features.dtype}, not numbers", path=path)
    features = np.asarray(features, np.float32)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise UserError(f"{int(bad.sum())} of {n} feature rows are not finite (NaN or inf), e.g. row "
                        f"{int(np.flatnonzero(bad)[0])}", path=path, hint="extract the slide's features again")
    return features


def check_inside(boxes: np.ndarray, size: tuple[int, int] | None, path: Path) -> None:
    """Every patch's top-left corner on the slide (UserError naming the file)."""
    if (boxes[:, :2] < 0).any():
        raise UserError("a patch starts left of or above the slide (negative coordinate)", path=path)
    if size is not None:
        w, h = size
        out = (boxes[:, 0] >= w) | (boxes[:, 1] >= h)
        if out.any():
            x, y = boxes[np.flatnonzero(out)[0], :2]
            raise UserError(f"{int(out.sum())} patch(es) start outside the {w}x{h} slide, e.g. at ({x}, {y})",
                            path=path, hint="the coordinates must be level-0 pixels of this slide")


def boxes_of(corners: np.ndarray, side0: int) -> np.ndarray:
    """(N, 4) int64 level-0 boxes from (N, 2) top-left corners and one side."""
    xy = np.rint(np.asarray(corners, np.float64)).astype(np.int64)
    return np.concatenate([xy, xy + int(side0)], axis=1)


def square_side(boxes: np.ndarray, n: int, path: Path) -> int:
    """The one side of ``n`` square level-0 boxes (what a writer is given; a UserError naming the output)."""
    boxes = np.asarray(boxes)
    if boxes.shape != (n, 4) or not n:
        raise UserError(f"{n} feature rows but boxes of shape {boxes.shape}: nothing written", path=path)
    sides = np.unique(np.concatenate([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]]))
    if len(sides) != 1 or sides[0] <= 0:
        raise UserError(f"the patches are not squares of one side (sides {sorted(sides.tolist())[:5]}): "
                        "the format has one patch size per file; nothing written", path=path)
    return int(sides[0])


def writable_features(features: np.ndarray, path: Path) -> np.ndarray:
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or not np.isfinite(features).all():
        raise UserError(f"features of shape {features.shape} are not a finite (patches, dimension) matrix: "
                        "nothing written", path=path)
    return features


# ---------------------------------------------------------------- files

@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[h5py.File]:
    """An HDF5 file open for reading; a missing, truncated or foreign file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError("feature file not found", path=path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"not a readable HDF5 file ({e})", path=path,
                        hint="copy it again (a truncated transfer?) or remove it from the folder") from None
    with f:
        yield f


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[h5py.File]:
    """An HDF5 file written under a temporary name and renamed onto ``path`` only when complete."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            yield f


def dataset(f: h5py.File, name: str, path: Path) -> np.ndarray:
    """A whole dataset; one that is not there, or is a group, is a UserError naming the file."""
    node = f.get(name)
    if not isinstance(node, h5py.Dataset):
        raise UserError(f"no dataset {name!r} (datasets: {', '.join(sorted(f.keys())) or 'none'})", path=path)
    try:
        return node[()]
    except (OSError, ValueError) as e:
        raise UserError(f"dataset {name!r} cannot be read ({e})", path=path,
                        hint="the file is damaged; copy or extract it again") from None


def shape(f: h5py.File, name: str, path: Path) -> tuple[int, ...]:
    """A dataset's shape without reading it (UserError naming the file when it is not there)."""
    node = f.get(name)
    if not isinstance(node, h5py.Dataset):
        raise UserError(f"no dataset {name!r} (datasets: {', '.join(sorted(f.keys())) or 'none'})", path=path)
    return tuple(node.shape)
