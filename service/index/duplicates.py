"""Near-duplicate groups over the whole index: every pair scoring above a threshold, joined into
connected components.

Cost: every stored vector scored against all the others, O(n^2 d) flops, in blocks of rows whose
score matrix holds at most ``BLOCK_RESULTS`` floats (16 MB) whatever the threshold. Measured on
a shared 2-core host at d=192: 0.5 s for 10k items and 2.2 s for 20k at load average 3, 12 s for
10k at load average 11. The cost grows with the square of the count, hence ``MAX_ITEMS``.
Memory is the vectors plus at most ``MAX_PAIRS`` pairs. Past ``MAX_ITEMS`` items or ``MAX_PAIRS``
linked pairs the search refuses with :class:`DuplicateSearchError` instead of running for minutes.
The last result is cached per store and threshold until the next add or delete, so paging through
the groups costs one search.

Groups are single-linkage: every member scores above the threshold with at least one other member,
not necessarily with all of them.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np

from service.index.store import IndexStore

MAX_ITEMS = 20_000
MAX_PAIRS = 2_000_000
BLOCK_RESULTS = 4_000_000  # scores held at once: block * n float32 (16 MB)
MAX_MEMBERS = 100  # members listed per group; ``size`` gives the true count


class DuplicateSearchError(ValueError):
    """The search would be too large; the message says what to change."""


@dataclass(frozen=True)
class Groups:
    """Connected components of the pair graph, largest first."""

    members: list[np.ndarray]  # per group: row numbers, in insertion order
    best: list[np.ndarray]  # per group: each member's best score within the group
    max_score: list[float]
    pairs: int
    items: int


def pairs_above(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, score) with i < j for every pair whose inner product exceeds ``threshold``.

    Blocks of rows against all rows with one BLAS product each (FAISS's range search measured
    ~4x slower here: it scores pairs without BLAS); only the upper triangle is kept."""
    n = len(vectors)
    block = max(1, min(n, BLOCK_RESULTS // max(n, 1)))
    found_i, found_j, found_s, total = [], [], [], 0
    for start in range(0, n, block):
        sims = vectors[start : start + block] @ vectors.T
        rows, cols = np.nonzero(sims > threshold)
        keep = cols > rows + start  # each pair once, no self-pairs
        rows, cols = rows[keep], cols[keep]
        total += len(rows)
        if total > MAX_PAIRS:
            raise DuplicateSearchError(
                f"threshold {threshold} links more than {MAX_PAIRS} pairs of items; raise the "
                "threshold (with a centred model, copies score above ~0.8, unrelated items ~0)"
            )
        found_i.append(rows + start)
        found_j.append(cols)
        found_s.append(sims[rows, cols])
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return (
        np.concatenate(found_i).astype(np.int64),
        np.concatenate(found_j).astype(np.int64),
        np.concatenate(found_s),
    )


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """A component label (its smallest member) per node: min-label hooking with pointer jumping,
    vectorised, so millions of edges take a fraction of a second without scipy."""
    labels = np.arange(n)
    while True:
        li, lj = labels[i], labels[j]
        low = np.minimum(li, lj)
        hooked = labels.copy()
        np.minimum.at(hooked, li, low)
        np.minimum.at(hooked, lj, low)
        while not np.array_equal(jumped := hooked[hooked], hooked):
            hooked = jumped
        if np.array_equal(hooked, labels):
            return labels
        labels = hooked


def _check_size(n: int) -> None:
    if n > MAX_ITEMS:
        raise DuplicateSearchError(
            f"the index holds {n} items; /duplicates compares every pair and is limited to "
            f"{MAX_ITEMS} items (its cost grows with the square of the count)"
        )


def find_groups(rows: np.ndarray, vectors: np.ndarray, threshold: float) -> Groups:
    """Groups of ``rows`` whose vectors (unit, so inner product = cosine) exceed ``threshold``."""
    n = len(rows)
    _check_size(n)
    if n < 2:
        return Groups([], [], [], 0, n)
    i, j, s = pairs_above(np.ascontiguousarray(vectors, np.float32), threshold)
    labels = components(n, i, j)
    best = np.full(n, -np.inf, np.float32)
    np.maximum.at(best, i, s)
    np.maximum.at(best, j, s)
    linked = np.flatnonzero(best > -np.inf)
    order = np.argsort(labels[linked], kind="stable")
    linked = linked[order]
    cuts = np.flatnonzero(np.diff(labels[linked])) + 1
    members = np.split(linked, cuts) if len(linked) else []
    groups = [(rows[m], best[m], float(best[m].max())) for m in members]
    groups.sort(key=lambda g: (-len(g[0]), -g[2], int(g[0][0])))
    return Groups([g[0] for g in groups], [g[1] for g in groups], [g[2] for g in groups], len(i), n)


class _Cache:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # one search at a time per store; others reuse its result
        self.key: tuple | None = None
        self.groups: Groups | None = None


_caches: weakref.WeakKeyDictionary[IndexStore, _Cache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def store_groups(store: IndexStore, threshold: float) -> Groups:
    """The duplicate groups of ``store`` at ``threshold``, reusing the last search while the
    store is unchanged."""
    with _caches_lock:
        cache = _caches.setdefault(store, _Cache())
    with cache.lock:
        _check_size(len(store))  # before reading every vector
        if cache.key == (threshold, store.version()) and cache.groups is not None:
            return cache.groups
        rows, vectors, version = store.all_vectors()
        cache.groups, cache.key = find_groups(rows, vectors, threshold), (threshold, version)
        return cache.groups
