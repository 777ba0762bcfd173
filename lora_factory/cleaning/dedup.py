"""Near-duplicate detection with a 64-bit DCT perceptual hash (pHash).

The same picture reaches a booru many times: re-encoded, resized, with a watermark or a
slightly different crop. Training on all copies over-weights that one picture, so only
one of each group survives. pHash keeps the signs of the 8x8 lowest frequencies of a
32x32 greyscale thumbnail relative to their median: re-encoding and resizing barely
move it, while a different drawing changes many bits. Two pictures are near duplicates
when their hashes differ in at most `max_distance` bits.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft
from PIL import Image

# Re-encoded or resized copies differ in 0-4 of the 64 bits, copies with a few pixels
# cropped off in up to about 8; separate drawings usually differ in more than 10. Only
# drawings that are the same picture shifted or rescaled come closer.
DEFAULT_MAX_DISTANCE = 6
_BLOCK = 1024  # rows compared at once: keeps the pairwise matrix small for big sets


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit DCT hash of `image` (most significant bit = lowest frequency)."""
    thumbnail = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    pixels = np.asarray(thumbnail, dtype=np.float64)
    low_frequencies = scipy.fft.dctn(pixels, type=2, norm="ortho")[:8, :8].ravel()
    # The DC term is the mean brightness: leaving it out of the median keeps the other
    # 63 bits balanced for very light or dark pictures.
    bits = low_frequencies > np.median(low_frequencies[1:])
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def hamming(a: int, b: int) -> int:
    """How many bits differ between two hashes."""
    return (a ^ b).bit_count()


def _as_hash_array(hashes: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray([int(h) for h in hashes], dtype=np.uint64)


def pairwise_hamming(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> np.ndarray:
    """[len(a), len(b)] bit distances between two lists of hashes."""
    left, right = _as_hash_array(a), _as_hash_array(b)
    return np.bitwise_count(left[:, None] ^ right[None, :]).astype(np.int64)


def near_duplicate_representatives(
    hashes: Sequence[int] | np.ndarray,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    priority: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """For every item, the index of the item that stands for its near-duplicate group.

    Groups are the connected components of "within `max_distance` bits". The
    representative is the member with the highest `priority` (e.g. pixel area: keep the
    largest copy), the first one on ties; it is its own representative.
    """
    values = _as_hash_array(hashes)
    count = len(values)
    rank = np.zeros(count) if priority is None else np.asarray(priority, dtype=np.float64)
    if rank.shape != (count,):
        raise ValueError(f"priority has {rank.shape} entries, hashes have {count}")
    parent = np.arange(count)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, count, _BLOCK):
        distances = np.bitwise_count(values[start : start + _BLOCK, None] ^ values[None, :])
        rows, columns = np.nonzero(distances <= max_distance)
        for row, column in zip(rows + start, columns, strict=True):
            if column > row:
                a, b = root(row), root(column)
                if a != b:
                    parent[max(a, b)] = min(a, b)

    roots = np.array([root(i) for i in range(count)], dtype=np.int64)
    representative = np.empty(count, dtype=np.int64)
    for group in np.unique(roots):
        members = np.flatnonzero(roots == group)
        # argmax returns the first maximum, so ties keep the earliest item.
        representative[members] = members[np.argmax(rank[members])]
    return representative


def near_duplicate_groups(
    hashes: Sequence[int] | np.ndarray,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    priority: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Boolean keep mask: True for the one item kept from each near-duplicate group."""
    representative = near_duplicate_representatives(hashes, max_distance, priority)
    return representative == np.arange(len(representative))


@dataclass(frozen=True)
class DuplicateVerdict:
    kept: bool
    duplicate_of: Hashable | None = None  # set when the new item is dropped
    replaced: tuple[Hashable, ...] = ()  # earlier items the new (larger) item displaced


class NearDuplicateIndex:
    """Streaming near-duplicate filter: items arrive one by one, memory holds only hashes.

    A new item that is within `max_distance` of kept items is dropped, unless its
    priority beats all of them: then it is kept and they are reported as replaced, so
    the largest copy survives whatever order the copies arrive in.
    """

    def __init__(self, max_distance: int = DEFAULT_MAX_DISTANCE):
        self.max_distance = max_distance
        self._keys: list[Hashable] = []
        self._priorities: list[float] = []
        self._hashes = np.zeros(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: Hashable, hash_value: int, priority: float = 0.0) -> DuplicateVerdict:
        if len(self._keys):
            distances = np.bitwise_count(self._hashes ^ np.uint64(hash_value))
            matches = np.flatnonzero(distances <= self.max_distance)
        else:
            matches = np.zeros(0, dtype=np.int64)
        if len(matches):
            best = max(matches, key=lambda i: (self._priorities[i], -i))
            if priority <= self._priorities[best]:
                return DuplicateVerdict(kept=False, duplicate_of=self._keys[best])
            replaced = tuple(self._keys[i] for i in matches)
            keep = np.ones(len(self._keys), dtype=bool)
            keep[matches] = False
            self._keys = [k for k, kept in zip(self._keys, keep, strict=True) if kept]
            self._priorities = [p for p, kept in zip(self._priorities, keep, strict=True) if kept]
            self._hashes = self._hashes[keep]
        else:
            replaced = ()
        self._keys.append(key)
        self._priorities.append(float(priority))
        self._hashes = np.append(self._hashes, np.uint64(hash_value))
        return DuplicateVerdict(kept=True, replaced=replaced)

    def remove(self, key: Hashable) -> None:
        """Forget a kept item (it was dropped later for another reason), so that a later
        copy of it is not dropped as the duplicate of nothing."""
        if key in self._keys:
            position = self._keys.index(key)
            del self._keys[position]
            del self._priorities[position]
            self._hashes = np.delete(self._hashes, position)
