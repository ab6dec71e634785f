"""The in-memory FAISS index over unit vectors (inner product = cosine), keyed by SQLite rows.

* flat: ``IndexIDMap2(IndexFlatIP)``, exact.
* hnsw: ``IndexIDMap2(IndexHNSWFlat, METRIC_INNER_PRODUCT)``. HNSW cannot remove vectors, so
  a deleted row becomes a tombstone: searches over-fetch and drop it; the store rebuilds the graph
  when tombstones pile up.
* ivf: ``IndexIVFFlat`` (or ``IndexIVFPQ`` when ``pq_m`` is set) over a flat IP quantizer. It needs
  training data, so it starts as an exact flat index and is trained on the stored vectors once
  ``train_min`` of them exist (FAISS wants ~39 points per list).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "hnsw", "ivf")
# Parameters that shape the built structure (a change means a rebuild) vs search-time knobs.
BUILD_PARAMS = {"flat": (), "hnsw": ("hnsw_m", "ef_construction"), "ivf": ("nlist", "pq_m")}
DEFAULTS = {
    "hnsw_m": 32,
    "ef_construction": 80,
    "ef_search": 64,
    "nlist": 256,
    "nprobe": 16,
    "pq_m": None,
    "train_min": None,  # default 39 * nlist
}


@contextmanager
def _threads_for(n_queries: int) -> Iterator[None]:
    """One OpenMP thread for a handful of queries: waking a thread team costs more than the search
    itself (measured here: HNSW 30k p50 7.4 ms with 2 threads vs 0.06 ms with 1, flat 100k 52 vs
    14 ms on a busy 2-core machine). Batches keep every thread. Callers hold the store's lock, so
    the process-wide setting is not raced."""
    if n_queries > 4:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@dataclass(frozen=True)
class AnnParams:
    index_type: str
    hnsw_m: int
    ef_construction: int
    ef_search: int
    nlist: int
    nprobe: int
    pq_m: int | None
    train_min: int

    @classmethod
    def make(cls, index_type: str, **params: object) -> AnnParams:
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown index parameter(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}"
            )
        merged = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
        if merged["train_min"] is None:
            merged["train_min"] = 39 * int(merged["nlist"])
        for key in ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe", "train_min"):
            if int(merged[key]) < 1:
                raise ValueError(f"index parameter {key} must be >= 1, got {merged[key]}")
        merged = {k: (int(v) if v is not None else None) for k, v in merged.items()}
        merged["train_min"] = max(merged["train_min"], merged["nlist"])
        return cls(index_type=index_type, **merged)

    def in_effect(self) -> dict[str, object]:
        """The parameters that matter for this index type (build and search knobs)."""
        knobs = {"flat": (), "hnsw": ("ef_search",), "ivf": ("nprobe", "train_min")}
        names = BUILD_PARAMS[self.index_type] + knobs[self.index_type]
        return {k: getattr(self, k) for k in names}

    def build_key(self) -> dict[str, object]:
        return {"index_type": self.index_type} | {
            k: getattr(self, k) for k in BUILD_PARAMS[self.index_type]
        }


class AnnIndex:
    """One FAISS index plus the tombstones it cannot remove. Not thread-safe: the store locks."""

    def __init__(self, dim: int, params: AnnParams, index: faiss.Index | None = None):
        self.dim = dim
        self.params = params
        self.tombstones: set[int] = set()
        self.index = index if index is not None else self._empty()
        self._tune()

    # ---- construction ---------------------------------------------------------------------
    def _empty(self) -> faiss.Index:
        if self.params.index_type == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.params.ef_construction
        else:  # flat, and ivf until it is trained
            inner = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIDMap2(inner)
        index.own_fields = True
        inner.this.disown()  # the IDMap frees it
        return index

    @property
    def is_ivf(self) -> bool:
        return isinstance(self.index, faiss.IndexIVF)

    def _tune(self) -> None:
        """Apply search-time knobs (they are not part of the snapshot's identity)."""
        if self.is_ivf:
            self.index.nprobe = min(self.params.nprobe, self.index.nlist)
        elif self.params.index_type == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = self.params.ef_search

    def wants_training(self) -> bool:
        return (
            self.params.index_type == "ivf"
            and not self.is_ivf
            and self.index.ntotal >= self.params.train_min
        )

    def train_ivf(self, seed: int = 0) -> None:
        """Replace the flat stand-in by a trained IVF holding the same rows and vectors."""
        p = self.params
        flat = faiss.downcast_index(self.index.index)
        n = self.index.ntotal
        vectors = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim).copy()
        rows = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        quantizer = faiss.IndexFlatIP(self.dim)
        if p.pq_m:
            metric = faiss.METRIC_INNER_PRODUCT
            index = faiss.IndexIVFPQ(quantizer, self.dim, p.nlist, p.pq_m, 8, metric)
        else:
            index = faiss.IndexIVFFlat(quantizer, self.dim, p.nlist, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        sample = vectors
        cap = 256 * p.nlist  # more points than this barely change the k-means centroids
        if n > cap:
            sample = vectors[np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))]
        log.info(
            "training IVF (nlist=%d, pq_m=%s) on %d of %d vectors", p.nlist, p.pq_m, len(sample), n
        )
        index.train(np.ascontiguousarray(sample))
        index.add_with_ids(vectors, rows)
        self.index = index
        self.tombstones.clear()
        self._tune()

    # ---- mutation -------------------------------------------------------------------------
    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        if len(rows):
            self.index.add_with_ids(vectors, np.ascontiguousarray(rows, dtype=np.int64))

    def remove(self, rows: list[int] | np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        if self.params.index_type == "hnsw" and not self.is_ivf:
            self.tombstones.update(int(r) for r in rows)
        else:
            self.index.remove_ids(rows)

    # ---- inspection -----------------------------------------------------------------------
    def stored_rows(self) -> np.ndarray:
        """Every row the FAISS structure holds, tombstoned ones included."""
        if self.is_ivf:
            lists = self.index.invlists
            parts = [
                faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                for i in range(self.index.nlist)
                if lists.list_size(i)
            ]
            return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    @property
    def live(self) -> int:
        return self.index.ntotal - len(self.tombstones)

    # ---- search ---------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, exclude: set[int] | None = None
    ) -> list[list[tuple[int, float]]]:
        """Best-first (row, score) lists, dropping tombstones and excluded rows (over-fetching)."""
        drop = self.tombstones | (exclude or set())
        total = self.index.ntotal
        if total == 0:
            return [[] for _ in range(len(queries))]
        fetch = min(total, k + len(drop))
        while True:
            with _threads_for(len(queries)):
                scores, rows = self.index.search(queries, fetch)
            results = [
                [(int(r), float(s)) for s, r in zip(srow, rrow, strict=True) if r not in drop]
                for srow, rrow in zip(scores, rows, strict=True)
            ]
            results = [[(r, s) for r, s in res if r >= 0][:k] for res in results]
            # Widen only where filtering ate results and the index had more to give (no -1 pads:
            # an IVF that ran out of probed candidates will not find more by asking for more).
            short = [len(res) < k and rows[i, -1] >= 0 for i, res in enumerate(results)]
            if fetch >= total or not any(short):
                return results
            fetch = min(total, fetch * 2)

    # ---- persistence ----------------------------------------------------------------------
    def serialize(self) -> np.ndarray:
        return faiss.serialize_index(self.index)

    @classmethod
    def deserialize(cls, dim: int, params: AnnParams, payload: np.ndarray) -> AnnIndex:
        index = faiss.deserialize_index(payload)
        if index.d != dim:
            raise ValueError(f"snapshot holds {index.d}-d vectors, expected {dim}")
        return cls(dim, params, index)
