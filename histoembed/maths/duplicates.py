"""Near-duplicates and outliers among images: perceptual hashes, kNN distances of embeddings as a robust
z-score, near-identical embeddings, byte-identical masks, and the groups they join into.

Pure functions on arrays of hashes and embeddings; QC reads the images and writes what they find.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from histoembed.core.config import QCSettings

HASH_SIZE = 16          # perceptual hash of HASH_SIZE**2 bits


def perceptual_hash(rgb: np.ndarray) -> np.ndarray:
    """256-bit DCT hash of the grey image (imagehash.phash, 16 x 16), as a bool vector.

    The 64-bit default hash mostly encodes the layout (a tissue blob on white), so distinct
    slides came as close as 4 bits; at 256 bits they stay >= 58 bits apart while resized,
    JPEG-recompressed copies stay within 10 (measured; see the QC issue note).
    """
    import imagehash  # pulls scipy: loaded only when QC runs

    return imagehash.phash(Image.fromarray(rgb).convert("L"), hash_size=HASH_SIZE).hash.flatten()


def hash_distances(bits: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances of hashes [N, B] (bool), as an [N, N] int matrix."""
    b = bits.astype(np.int32)
    return b @ (1 - b).T + (1 - b) @ b.T


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_distance(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance of each row to its k nearest other rows."""
    u = unit_rows(embeddings)
    dist = 1.0 - u @ u.T
    np.fill_diagonal(dist, np.inf)
    k = min(k, len(u) - 1)
    return np.sort(dist, axis=1)[:, :k].mean(axis=1)


def robust_z(x: np.ndarray, min_scale: float = 0.05) -> np.ndarray:
    """(x - median) / (1.4826 MAD), the MAD floored at ``min_scale`` x median.

    The floor keeps a set of near-identical clean images (MAD ~ 0) from turning tiny
    differences into huge z-scores.
    """
    med = float(np.median(x))
    mad = 1.4826 * float(np.median(np.abs(x - med)))
    return (x - med) / max(mad, min_scale * abs(med), 1e-12)


def centred_cosine(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity after removing the dataset mean.

    Every tissue image shares a large common component; without centring, any encoder
    puts most pairs of different images above 0.98. Exact copies stay at 1.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    u = unit_rows(x - x.mean(axis=0, keepdims=True))
    return u @ u.T


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def duplicate_pairs(hashes: np.ndarray, similarity: np.ndarray | None,
                    settings: QCSettings) -> list[tuple[int, int, str]]:
    """(i, j, why) for every near-duplicate pair: close hashes [N, B] or near-identical embeddings."""
    dist = hash_distances(hashes)
    close = dist <= settings.hash_distance
    similar = np.zeros_like(close)
    if similarity is not None:
        similar = np.nan_to_num(similarity, nan=-1.0) >= settings.duplicate_cosine
    pairs = []
    for i, j in zip(*np.nonzero(np.triu(close | similar, k=1))):
        why = []
        if close[i, j]:
            why.append(f"hash distance {dist[i, j]}")
        if similar[i, j]:
            why.append(f"cosine {similarity[i, j]:.3f}")
        pairs.append((int(i), int(j), ", ".join(why)))
    return pairs


def mask_twins(digests: Sequence[str | None]) -> list[list[int]]:
    """Groups (two or more, in order) of indices whose mask files have the same sha256; None never matches."""
    by_digest: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        if d is not None:
            by_digest.setdefault(d, []).append(i)
    return [g for g in by_digest.values() if len(g) > 1]


def duplicate_groups(n: int, pairs: Iterable[tuple[int, int, str]]) -> list[int | None]:
    """Group numbers 0.. (in order of each group's first image) by union-find; None when alone."""
    uf = _UnionFind(n)
    for i, j, _ in pairs:
        uf.union(i, j)
    roots = [uf.find(i) for i in range(n)]
    sizes: dict[int, int] = {}
    for r in roots:
        sizes[r] = sizes.get(r, 0) + 1
    numbers: dict[int, int] = {}
    groups: list[int | None] = []
    for r in roots:
        if sizes[r] < 2:
            groups.append(None)
            continue
        numbers.setdefault(r, len(numbers))
        groups.append(numbers[r])
    return groups
