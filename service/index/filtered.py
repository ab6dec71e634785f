"""Filtered search on the embedded index: k results from the matching items, never fewer.

Post-filtering the ANN's top k starves on a rare label (100 matches in 100k items: the top 10 of
the whole index rarely holds one). So the matching rows come first (SQLite), then:

* few matches (``EXACT_MAX``): an exact scan of their vectors read from SQLite;
* more: FAISS restricted to them with an id selector (exact for flat; HNSW and IVF search only
  selected ids), falling back to the exact scan for any query the ANN left short of k.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import OrderedDict

import faiss
import numpy as np

from service.index.ann import AnnIndex, auto_nprobe
from service.index.filters import Filter, sqlite_rows

EXACT_MAX = 4096  # an exact scan of this many vectors costs about one ANN query
_CHUNK = 500


class MatchCache:
    """Matching rows per filter, kept while the index is unchanged: the SQLite scan (JSON parsed
    per row, ~10 ms per 10k items) is paid once per filter and index version, not per query."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def rows(self, conn: sqlite3.Connection, flt: Filter, version: tuple) -> np.ndarray:
        key = (json.dumps(flt, sort_keys=True), version)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        found = sqlite_rows(conn, flt)
        with self._lock:
            self._entries[key] = found
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return found


def _vectors(conn: sqlite3.Connection, rows: np.ndarray, dim: int) -> np.ndarray:
    out = np.empty((len(rows), dim), np.float32)
    where = {int(r): i for i, r in enumerate(rows)}
    for start in range(0, len(rows), _CHUNK):
        chunk = [int(r) for r in rows[start : start + _CHUNK]]
        marks = ",".join("?" * len(chunk))
        for row, blob in conn.execute(
            f"SELECT row, vector FROM items WHERE row IN ({marks})", chunk
        ):
            out[where[int(row)]] = np.frombuffer(blob, dtype="<f4")
    return out


def _stored(ann: AnnIndex | None, conn: sqlite3.Connection, rows: np.ndarray, dim: int):
    """The rows' vectors: from FAISS's memory where it keeps them exactly (flat, HNSW: ~100x
    faster than reading SQLite), else from SQLite (IVF has no id -> vector map)."""
    if ann is not None and not ann.is_ivf:
        return ann.index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64))
    return _vectors(conn, rows, dim)


def exact(
    conn: sqlite3.Connection,
    rows: np.ndarray,
    queries: np.ndarray,
    k: int,
    ann: AnnIndex | None = None,
) -> list[list[tuple[int, float]]]:
    """Best-first (row, score) over exactly these rows."""
    vecs = _stored(ann, conn, rows, queries.shape[1])
    scores = queries @ vecs.T
    take = min(k, len(rows))
    out = []
    for srow in scores:
        best = np.argpartition(-srow, take - 1)[:take]
        best = best[np.argsort(-srow[best], kind="stable")]
        out.append([(int(rows[i]), float(srow[i])) for i in best])
    return out


def _params(ann: AnnIndex, selector: faiss.IDSelector, k: int) -> faiss.SearchParameters:
    if ann.is_ivf:
        nprobe = int(ann.index.nprobe) or auto_nprobe(ann.index.nlist)
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
    if ann.params.index_type == "hnsw":
        return faiss.SearchParametersHNSW(sel=selector, efSearch=max(ann.params.ef_search, k))
    return faiss.SearchParameters(sel=selector)


def search_rows(
    ann: AnnIndex,
    conn: sqlite3.Connection,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray,
) -> list[list[tuple[int, float]]]:
    """Best-first (row, score) per query among ``allowed`` rows (live rows, from SQLite)."""
    if not len(allowed):
        return [[] for _ in range(len(queries))]
    if len(allowed) <= EXACT_MAX:
        return exact(conn, allowed, queries, k, ann)
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    scores, rows = ann.index.search(queries, k, params=_params(ann, selector, k))
    results = [
        [(int(r), float(s)) for s, r in zip(srow, rrow, strict=True) if r >= 0]
        for srow, rrow in zip(scores, rows, strict=True)
    ]
    want = min(k, len(allowed))
    for i, res in enumerate(results):
        if len(res) < want:  # the graph or the probed lists ran out of matches: scan them all
            results[i] = exact(conn, allowed, queries[i : i + 1], k, ann)[0]
    return results
