"""The in-memory FAISS index over unit vectors (inner product = cosine), keyed by SQLite rows.

* flat: ``IndexIDMap2(IndexFlatIP)``, exact.
* hnsw: ``IndexIDMap2(IndexHNSWFlat, METRIC_INNER_PRODUCT)``. HNSW cannot remove vectors, so
  a deleted row becomes a tombstone: searches over-fetch and drop it; the store rebuilds the graph
  when tombstones pile up.
* ivf: ``IndexIVFFlat`` (or ``IndexIVFPQ`` when ``pq_m`` is set) over a flat IP quantizer. It needs
  training data, so it starts as an exact flat index and is trained on the stored vectors once
  ``train_min`` of them exist (FAISS wants ~39 points per list). Unless ``nlist`` is given, the
  number of lists is chosen from the vectors present when it is trained (``auto_nlist``: about
  4 sqrt(n), FAISS's guidance being 4-16 sqrt(n)), and ``nprobe`` from the lists
  (``auto_nprobe``). The trained index carries its lists into the snapshot, so a restart keeps
  them; an index that has outgrown them 4x (``outgrown``) is retrained when the store next opens.
"""

from __future__ import annotations

import logging
import math
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
    "nlist": None,  # auto_nlist(n) when trained
    "nprobe": None,  # auto_nprobe(nlist)
    "pq_m": None,
    "train_min": None,  # 39 * nlist when nlist is given, else AUTO_TRAIN_MIN
}
# With automatic lists IVF starts at ~10k vectors (256 lists); below that an exact scan is ~1 ms.
AUTO_TRAIN_MIN = 39 * 256
POINTS_PER_LIST = 39  # FAISS warns below 39 training points per list
TRAIN_POINTS_PER_LIST = 64  # k-means sample cap: more barely moves the centroids, costs linearly
OUTGROWN = 4  # retrain (at the next open) once the automatic choice is 4x the trained lists


def auto_nlist(n: int) -> int:
    """Lists for ``n`` vectors: the power of two nearest 4 sqrt(n) (the low end of FAISS's 4-16
    sqrt(n): k-means and adding cost grow with the lists), with >= 39 training points per list.
    10k -> 256, 100k -> 1024, 1M -> 4096. On the benchmark's clustered 384-d vectors at 100k,
    1024 lists with nprobe 16 give recall@10 0.998 at 0.47 ms vs 0.967 at 1.1 ms for 256."""
    if n < 2 * POINTS_PER_LIST:
        return 1
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    while nlist > 1 and nlist * POINTS_PER_LIST > n:
        nlist //= 2
    return nlist


def auto_nprobe(nlist: int) -> int:
    """Lists searched per query: 16, or 1/64 of the lists when there are more than 1024 (a probe
    then reads ~n/64 vectors: ~1-2 ms at 1M). 256 -> 16, 1024 -> 16, 4096 -> 64."""
    return min(nlist, max(16, nlist // 64))


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
    nlist: int | None  # None: chosen from n when trained
    nprobe: int | None  # None: chosen from the trained lists
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
            nlist = merged["nlist"]
            merged["train_min"] = AUTO_TRAIN_MIN if nlist is None else POINTS_PER_LIST * int(nlist)
        for key in ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe", "train_min"):
            if merged[key] is not None and int(merged[key]) < 1:
                raise ValueError(f"index parameter {key} must be >= 1, got {merged[key]}")
        merged = {k: (int(v) if v is not None else None) for k, v in merged.items()}
        merged["train_min"] = max(merged["train_min"], merged["nlist"] or 1)
        return cls(index_type=index_type, **merged)

    def in_effect(self) -> dict[str, object]:
        """The parameters that matter for this index type (build and search knobs); "auto" for
        IVF lists and probes chosen at training (``AnnIndex.in_effect`` gives the chosen ones)."""
        knobs = {"flat": (), "hnsw": ("ef_search",), "ivf": ("nprobe", "train_min")}
        names = BUILD_PARAMS[self.index_type] + knobs[self.index_type]
        out = {k: getattr(self, k) for k in names}
        return {k: "auto" if v is None and k in ("nlist", "nprobe") else v for k, v in out.items()}

    def build_key(self) -> dict[str, object]:
        """What a snapshot must have been built with to be reused: automatic lists match any
        trained count (the snapshot holds the one chosen), a given ``nlist`` only itself."""
        return {"index_type": self.index_type} | {
            k: v for k, v in self.in_effect().items() if k in BUILD_PARAMS[self.index_type]
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
            nlist = self.index.nlist
            self.index.nprobe = min(self.params.nprobe or auto_nprobe(nlist), nlist)
        elif self.params.index_type == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = self.params.ef_search

    def in_effect(self) -> dict[str, object]:
        """``AnnParams.in_effect`` with the lists and probes of the trained IVF filled in."""
        out = self.params.in_effect()
        if self.is_ivf:
            out.update(nlist=int(self.index.nlist), nprobe=int(self.index.nprobe))
        return out

    def wants_training(self) -> bool:
        return (
            self.params.index_type == "ivf"
            and not self.is_ivf
            and self.index.ntotal >= self.params.train_min
        )

    def outgrown(self) -> bool:
        """A trained IVF with automatic lists whose vectors now call for 4x as many lists (~16x
        the vectors it was trained on): worth retraining, which the store does when it opens."""
        return (
            self.is_ivf
            and self.params.nlist is None
            and auto_nlist(self.live) >= OUTGROWN * self.index.nlist
        )

    def train_ivf(self, seed: int = 0) -> None:
        """Replace the flat stand-in by a trained IVF holding the same rows and vectors."""
        p = self.params
        flat = faiss.downcast_index(self.index.index)
        n = self.index.ntotal
        nlist = p.nlist or auto_nlist(n)
        vectors = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim).copy()
        rows = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        quantizer = faiss.IndexFlatIP(self.dim)
        if p.pq_m:
            metric = faiss.METRIC_INNER_PRODUCT
            index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, p.pq_m, 8, metric)
        else:
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        sample = vectors
        cap = TRAIN_POINTS_PER_LIST * nlist
        if n > cap:
            sample = vectors[np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))]
        log.info(
            "training IVF (nlist=%d%s, pq_m=%s) on %d of %d vectors",
            nlist, "" if p.nlist else " chosen for n", p.pq_m, len(sample), n,
        )  # fmt: skip
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
