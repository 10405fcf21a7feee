"""Inputs that only the tests and the benchmarks need, beside the tests that use them.

- :func:`write_synthetic_features`: a feature store and crops.parquet with a known class signal, as the
  embed stage writes them, without drawing or embedding a pixel (tests of fit, submit, drift, compare);
- :func:`write_blank_png`: what a decompression bomb looks like (tests of the data check);
- :func:`folder_digest`: one sha256 over a folder's files, to pin what a seed writes.

Tests import it as ``synthetic_inputs`` (pytest puts tests/ on the path); the benchmarks put tests/ on
``sys.path`` and import the same module, so there is one copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from histoembed.core import feature_store, store
from histoembed.tools.synthetic import LABELS


def write_synthetic_features(run: Path, n_images: int = 60, n_classes: int = 3, crops: int = 2, views: int = 2,
                             dim: int = 16, signal: float = 1.0, seed: int = 0, encoder: str = "synthetic",
                             n_test: int = 0, visible: list[int] | None = None,
                             feature_seed: int | None = None) -> Path:
    """A feature store and crops.parquet with a known signal, written as the embed stage would.

    Like real encoder features, most variance lies in a few directions: a random subspace of
    ``min(dim, 32)`` dimensions holds the class means (spread set by ``signal``), the image's
    own variation and each crop's; a little isotropic noise fills every dimension, and
    views 1.. add augmentation noise (view 0 is the clean crop). Test images (``n_test``)
    get a random class and no label; they are named from img_0000.png like the training images,
    as in the real challenge. Returns the store folder ``run/features/<slug>``.

    Several encoders of one run (``fit --encoder A,B``): call once per ``encoder`` with the same
    ``seed`` (the same crops) and its own ``feature_seed``; ``visible[c]`` is the class mean that
    images of class c get in this encoder's features, so ``visible=[0, 0, 1, 1]`` shows only
    {0, 1} against {2, 3}.
    """
    rng = np.random.default_rng(seed if feature_seed is None else feature_seed)
    shown = list(range(n_classes)) if visible is None else [int(v) for v in visible]
    names = list(LABELS[:n_classes]) if n_classes <= len(LABELS) else \
        [f"class-{k}" for k in range(n_classes)]
    rank = min(dim, 32)
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0]          # orthonormal columns
    means = rng.normal(size=(n_classes, rank)) * signal * 3 / np.sqrt(rank)
    ids = [f"img_{i:04d}.png" for i in [*range(n_images), *range(n_test)]]   # test names repeat training ones
    splits = ["train" if i < n_images else "test" for i in range(len(ids))]
    truth = [i % n_classes if i < n_images else int(rng.integers(n_classes)) for i in range(len(ids))]
    labels = [names[t] if s == "train" else None for t, s in zip(truth, splits)]
    rows = {"image_id": [], "split": [], "crop_index": [], "view": []}
    emb = []
    for i, image_id in enumerate(ids):
        centre = means[shown[truth[i]]] + rng.normal(size=rank)
        for c in range(crops):
            crop = basis @ (centre + rng.normal(size=rank)) + rng.normal(size=dim) * 0.5
            for v in range(views):
                emb.append(crop + rng.normal(size=dim) * (0.0 if v == 0 else 0.3))
                rows["image_id"].append(image_id)
                rows["split"].append(splits[i])
                rows["crop_index"].append(c)
                rows["view"].append(v)
    run = Path(run)
    n_crops = len(ids) * crops
    crops_table = pa.table({
        "image_id": pa.array([i for i in ids for _ in range(crops)], pa.string()),
        "split": pa.array([s for s in splits for _ in range(crops)], pa.string()),
        "label": pa.array([lab for lab in labels for _ in range(crops)], pa.string()),
        "crop_index": pa.array([c for _ in ids for c in range(crops)], pa.int32()),
        **{name: pa.array(np.zeros(n_crops, np.int32)) for name in ("x0", "y0", "x1", "y1")},
        "tissue_fraction": pa.array(np.ones(n_crops, np.float32)),
        "strategy": pa.array(["synthetic"] * n_crops, pa.string()),
        "scale": pa.array(np.ones(n_crops, np.float32)),
        "png": pa.array([b""] * n_crops, pa.binary()),
    }, schema=store.CROPS_SCHEMA)
    crops_key = store.config_key("crops", seed, n_images, n_test, crops)
    store.write_table(crops_table, run / store.CROPS_FILE, meta={"key": crops_key})
    embedding = np.asarray(emb, dtype=np.float32)
    table = pa.table({
        "image_id": pa.array(rows["image_id"], pa.string()), "split": pa.array(rows["split"], pa.string()),
        "crop_index": pa.array(rows["crop_index"], pa.int32()), "view": pa.array(rows["view"], pa.int16()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embedding.ravel()), dim),
    }, schema=feature_store.feature_schema(dim))
    store_dir = run / store.FEATURES_DIR / feature_store.encoder_slug(encoder)
    key = store.config_key("synthetic", n_images, n_classes, crops, views, dim, signal, seed, n_test,
                           *([] if visible is None and feature_seed is None else [shown, feature_seed]))
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(store_dir)
    store.write_table(table, store_dir / "part-00000.parquet",
                      meta={"key": key, "encoder": encoder, "dim": dim, "pool": "synthetic", "seed": seed,
                            "crops_key": crops_key, "repeats": views, "tta": True})
    return store_dir


def write_blank_png(path: Path, width: int, height: int, complete: bool = True) -> None:
    """A black 8-bit gray PNG of any size, streamed row by row (a 30000 x 30000 one is about 0.9 MB).

    This is what a decompression bomb looks like: a small file whose header promises far more
    pixels than memory holds. ``complete=False`` writes the header alone (enough for checks
    that never decode).
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        if complete:
            deflate, row = zlib.compressobj(9), bytes(width + 1)  # filter byte 0, then the row's pixels
            data = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
            f.write(chunk(b"IDAT", data))
        f.write(chunk(b"IEND", b""))


def folder_digest(folder: Path) -> str:
    """sha256 over each file's relative path and sha256, in path order: equal iff the same files, byte for byte."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(folder).as_posix()} {hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def flag_patches(run: Path, flags: dict[tuple[str, int], list[str]], whole: dict[str, list[str]] = {}) -> None:
    """Give training crops of ``run/crops.parquet`` artifact flags, as a slide's patches have them: ``flags`` by
    (image_id, crop_index), ``whole`` for every crop of an image; the other crops get none."""
    import pyarrow.parquet as pq

    path = run / store.CROPS_FILE
    crops = pq.read_table(path)
    column = [whole.get(i, flags.get((i, c), [])) if s == "train" else []
              for i, c, s in zip(*(crops[k].to_pylist() for k in ("image_id", "crop_index", "split")))]
    store.write_table(crops.append_column("flags", pa.array(column, pa.list_(pa.string()))), path,
                      meta=store.read_meta(path))
