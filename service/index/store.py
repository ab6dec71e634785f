"""Durable nearest-neighbour index: FAISS in memory, SQLite on disk.

API (all methods thread-safe; one lock guards both halves)::

    store = IndexStore.open(data_dir, model_sha256, dim, index_type="flat", model_name=None,
                            snapshot_every=10_000, **params)   # IndexModelMismatch if not ours
    ids = store.add(vectors [n,dim], ids=None, metadata=None, sources=None, thumbnails=None,
                    source_roots=None)
    store.delete(id) -> bool            store.get(id) -> Item | None
    store.thumbnail(id) -> bytes|None   store.vector(id) -> np.ndarray | None (unit float32)
    store.search(query [n,dim] or [dim], k, exclude_ids=None, filter=None)
        -> list[list[Hit(id, score, metadata)]]   (per query row, best first)
    store.similar(id, k, filter=None) -> list[Hit] | None   (itself left out; None: unknown id)
    (filter: metadata equalities, ``service.index.filters``; k results whenever k items match)
    store.list_items(offset=0, limit=50) -> (list[Item] newest first, total)   Item.to_dict()
    store.existing(ids) -> set[str]     len(store)    store.stats() -> dict
    store.snapshot()                    store.close()  (snapshot + close; also a context manager)

Errors for the server: ``DuplicateIdError`` (409) and ``InvalidItemError`` (422), both
``ValueError``; ``IndexModelMismatch`` at open. Vectors are L2-normalised on the way in, so scores
are cosines. A source is a path relative to its source root (``build``'s ``--images``), the
only kind ``rebuild`` re-reads; without a root it is only a name (uploads). ``Item.source``
never shows a server path: the relative path, or the name. Params: hnsw_m, ef_construction,
ef_search (hnsw); nlist, nprobe, pq_m and train_min (ivf).
``service.index.meta.read_info(data_dir)`` describes a data dir without a model.

Durability: ``add`` and ``delete`` return only after their SQLite transaction is fsynced (WAL,
synchronous=FULL). ``index.faiss`` is only a snapshot to start fast: on open the store loads it if
valid, re-adds rows committed after its sequence and removes rows deleted since; without a usable
snapshot it rebuilds from SQLite. So every acknowledged item is searchable after a crash. One
process at a time may open a data dir (``flock`` on ``DATA_DIR/.lock``; a second gets
``IndexStoreError``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from service.index import filtered
from service.index import validate as v
from service.index.ann import AnnIndex, AnnParams
from service.index.db import DB_FILE, ItemDB, utc_now
from service.index.errors import DuplicateIdError, IndexStoreError
from service.index.filters import check_filter
from service.index.lock import DirLock
from service.index.meta import NO_TRANSFORM, check_meta
from service.index.snapshot import SNAPSHOT_FILE, usable_snapshot, write_snapshot
from service.index.whole import WholeIndexReads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    id: str
    metadata: dict
    source: str | None
    created_at: str
    has_thumbnail: bool

    def to_dict(self) -> dict:
        return asdict(self)


class Hit(NamedTuple):
    id: str
    score: float
    metadata: dict


def _item(found: tuple) -> Item:
    iid, meta, source, root, created, has_thumb = found
    return Item(iid, json.loads(meta), v.shown_source(source, root), created, bool(has_thumb))


class IndexStore(WholeIndexReads):
    """Use :meth:`open`; the constructor takes already-recovered parts."""

    def __init__(self, data_dir: Path, db: ItemDB, ann: AnnIndex, meta: dict, snapshot_every: int):
        self.data_dir = data_dir
        self.dim = ann.dim
        self.model_sha256 = meta["model_sha256"]
        self.model_name = meta.get("model_name") or None
        self.transform = meta.get("embedding_transform", NO_TRANSFORM)
        self.snapshot_every = snapshot_every
        self.tombstone_rebuild = 0.1  # HNSW: rebuild the graph at snapshot past this dead share
        self._db, self._ann = db, ann
        self._seq = int(meta.get("next_row", "0")) - 1  # every row <= _seq is in the index
        self._pending = 0  # adds and deletes since the last snapshot
        self._snapshot_at: float | None = None
        self._lock = threading.RLock()
        self._snap_lock = threading.Lock()
        self._closed = False
        self._dir_lock: DirLock | None = None
        self._matches = filtered.MatchCache()  # filter -> rows, per (last row, live count)

    # ---- opening and recovery -----------------------------------------------------------------
    @classmethod
    def open(
        cls,
        data_dir: Path | str,
        model_sha256: str,
        dim: int,
        index_type: str = "flat",
        *,
        model_name: str | None = None,
        transform: str = NO_TRANSFORM,
        snapshot_every: int = 10_000,
        progress: bool = True,
        lock: DirLock | None = None,
        **params: object,
    ) -> IndexStore:
        """``lock``: the data dir's lock when the caller already holds it (it is released on
        close or on failure)."""
        data_dir = Path(data_dir)
        ann_params = AnnParams.make(index_type, **params)
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = lock or DirLock(data_dir)
        db = None
        try:
            db = ItemDB(data_dir / DB_FILE)
            meta = check_meta(db, data_dir, model_sha256, dim, index_type, model_name, transform)
            store = cls._recover(data_dir, db, meta, dim, ann_params, snapshot_every, progress)
        except BaseException:
            if db is not None:
                db.close()
            lock.release()
            raise
        store._dir_lock = lock
        return store

    @classmethod
    def _recover(cls, data_dir, db, meta, dim, params, snapshot_every, progress) -> IndexStore:
        t0 = time.perf_counter()
        path = data_dir / SNAPSHOT_FILE
        ann, seq, written_at, dead = None, -1, None, 0
        if not path.exists() and db.count():
            log.warning("no index snapshot in %s; rebuilding from SQLite", data_dir)
        elif path.exists():
            ann, seq, written_at, dead = usable_snapshot(path, meta, dim, params)
        store = cls(data_dir, db, ann or AnnIndex(dim, params), meta, snapshot_every)
        if ann is None:
            store._rebuild(progress)
            store._pending = db.count()
            if store._pending:
                store.snapshot()
        else:
            store._snapshot_at = written_at
            added = store._replay(seq, progress)
            stale = np.setdiff1d(ann.stored_rows(), db.row_numbers(), assume_unique=True)
            ann.remove(stale)
            store._pending = added + max(0, len(stale) - dead)  # old tombstones are not news
            if ann.wants_training():
                ann.train_ivf()
            log.info(
                "replayed %d adds and %d deletes after snapshot seq %d", added, len(stale), seq
            )
            if ann.outgrown():  # automatic IVF lists chosen for far fewer vectors: retrain now
                log.info("IVF index outgrew its %d lists; rebuilding", ann.index.nlist)
                store._rebuild(progress)
                store._pending = db.count()
        log.info(
            "index %s: %d items (%s, model %s) ready in %.2f s",
            data_dir, len(store), params.index_type, meta["model_sha256"][:12],
            time.perf_counter() - t0,
        )  # fmt: skip
        return store

    def _replay(self, after_row: int, progress: bool) -> int:
        total = self._db.count_after(after_row)
        bar = tqdm(
            total=total, unit="vec", desc="replaying index", disable=not progress or not total
        )
        with bar:
            for rows, vectors in self._db.iter_vectors(self.dim, after_row):
                self._ann.add(rows, vectors)
                bar.update(len(rows))
        return total

    def _rebuild(self, progress: bool) -> None:
        """A fresh FAISS index from every SQLite row (snapshot missing, corrupt or outdated)."""
        self._ann = AnnIndex(self.dim, self._ann.params)
        total = self._db.count()
        log.info("building the %s index from %d stored vectors", self._ann.params.index_type, total)
        self._replay(-1, progress)
        if self._ann.wants_training():
            self._ann.train_ivf()

    # ---- writes -------------------------------------------------------------------------------
    def add(
        self,
        vectors: np.ndarray,
        ids: Sequence[str] | None = None,
        metadata: Sequence[dict | None] | None = None,
        sources: Sequence[str | None] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        source_roots: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Add items; returns their ids once they are durable on disk. All or nothing."""
        vecs = v.as_unit_rows(vectors, self.dim)
        n = len(vecs)
        ids = v.check_ids(ids, n)
        metas = [v.metadata_json(m) for m in v.per_item(metadata, n, "metadata")]
        roots = v.per_item(source_roots, n, "source_roots")
        srcs = [
            v.check_source(s, r)
            for s, r in zip(v.per_item(sources, n, "sources"), roots, strict=True)
        ]
        thumbs = [v.check_thumbnail(t) for t in v.per_item(thumbnails, n, "thumbnails")]
        if n == 0:
            return []
        with self._lock:
            self._check_open()
            try:
                rows = self._db.insert(ids, vecs, metas, srcs, thumbs)
            except sqlite3.IntegrityError as exc:
                taken = self._db.existing(ids)
                if taken:
                    raise DuplicateIdError(sorted(taken)) from None
                raise IndexStoreError(f"could not store items: {exc}") from exc
            self._ann.add(rows, vecs)
            self._seq = int(rows[-1])
            self._pending += n
            if self._ann.wants_training():
                self._ann.train_ivf()
            due = self._pending >= self.snapshot_every
        if due:
            self.snapshot()
        return ids

    def delete(self, item_id: str) -> bool:
        """Delete durably; False when the id is unknown."""
        with self._lock:
            self._check_open()
            row = self._db.delete(item_id)
            if row is None:
                return False
            self._ann.remove([row])
            self._pending += 1
            return True

    # ---- reads --------------------------------------------------------------------------------
    def get(self, item_id: str) -> Item | None:
        with self._lock:
            found = self._db.get(item_id)
        if found is None:
            return None
        return _item(found)

    def list_items(self, offset: int = 0, limit: int = 50) -> tuple[list[Item], int]:
        """A page of items, newest first, and the total count (for a gallery)."""
        with self._lock:
            return [_item(r) for r in self._db.page(offset, limit)], self._db.count()

    def thumbnail(self, item_id: str) -> bytes | None:
        with self._lock:
            return self._db.thumbnail(item_id)

    def vector(self, item_id: str) -> np.ndarray | None:
        with self._lock:
            blob = self._db.vector(item_id)
        return None if blob is None else np.frombuffer(blob, dtype="<f4").astype(np.float32)

    def existing(self, ids: Iterable[str]) -> set[str]:
        with self._lock:
            return set(self._db.existing(list(ids)))

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and bool(self.existing([item_id]))

    def __len__(self) -> int:
        with self._lock:
            return self._ann.live

    def search(
        self,
        query: np.ndarray,
        k: int = 10,
        exclude_ids: Iterable[str] | None = None,
        filter: dict | None = None,
    ) -> list[list[Hit]]:
        """Per query row, up to k hits best first (cosine score), excluded ids left out, only
        items whose metadata matches ``filter`` when one is given."""
        k = v.check_k(k)
        queries = v.as_unit_rows(query, self.dim, "query")
        flt = check_filter(filter)
        with self._lock:
            self._check_open()
            exclude = set(self._db.row_of(list(exclude_ids)).values()) if exclude_ids else set()
            if flt:
                version = (self._seq, self._ann.live)  # every add or delete changes one
                allowed = self._matches.rows(self._db.conn, flt, version)
                allowed = allowed[~np.isin(allowed, list(exclude))] if exclude else allowed
                found = filtered.search_rows(self._ann, self._db.conn, queries, k, allowed)
            else:
                found = self._ann.search(queries, k, exclude)
            described = self._db.describe_rows(sorted({r for res in found for r, _ in res}))
        return [
            [Hit(described[r][0], s, json.loads(described[r][1])) for r, s in res if r in described]
            for res in found
        ]

    def similar(self, item_id: str, k: int = 10, filter: dict | None = None) -> list[Hit] | None:
        """Nearest neighbours of a stored item, itself excluded; None when the id is unknown."""
        with self._lock:
            vec = self.vector(item_id)
            if vec is None:
                return None
            return self.search(vec, k, exclude_ids=[item_id], filter=filter)[0]

    def stats(self) -> dict:
        with self._lock:
            ann = self._ann
            return {
                "count": ann.live,
                "dim": self.dim,
                "type": ann.params.index_type,
                "model_sha256": self.model_sha256,
                "model_name": self.model_name,
                "embedding_transform": self.transform,
                "data_dir": str(self.data_dir),
                "snapshot_age_s": None
                if self._snapshot_at is None
                else round(time.time() - self._snapshot_at, 3),
                "pending_since_snapshot": self._pending,
                "tombstones": len(ann.tombstones),
                "trained": ann.is_ivf if ann.params.index_type == "ivf" else None,
                "params": ann.in_effect(),
            }

    # ---- snapshots and shutdown ---------------------------------------------------------------
    def snapshot(self) -> None:
        """Write index.faiss atomically (serialising holds the lock, the disk write does not)."""
        with self._snap_lock:
            with self._lock:
                self._check_open()
                ann = self._ann
                stored = ann.index.ntotal
                if ann.tombstones and len(ann.tombstones) > self.tombstone_rebuild * stored:
                    self._rebuild(progress=False)
                    ann = self._ann
                header = {
                    "format": 1,
                    "seq": self._seq,
                    "model_sha256": self.model_sha256,
                    "dim": self.dim,
                    "build": ann.params.build_key(),
                    "trained": ann.is_ivf,
                    "count": ann.live,
                    "tombstones": len(ann.tombstones),
                    "written_at": time.time(),
                }
                payload, covered = ann.serialize(), self._pending
            write_snapshot(self.data_dir / SNAPSHOT_FILE, header, payload)
            with self._lock:
                self._pending -= covered
                self._snapshot_at = header["written_at"]
                if not self._closed:
                    self._db.set_meta(snapshot_seq=header["seq"], snapshot_at=utc_now())
            log.info(
                "index snapshot written: %d vectors up to row %d", header["count"], header["seq"]
            )

    def close(self) -> None:
        """Snapshot if anything changed since the last one, then close SQLite. Idempotent."""
        with self._lock:
            if self._closed:
                return
            dirty = self._pending > 0 or not (self.data_dir / SNAPSHOT_FILE).exists()
        if dirty:
            self.snapshot()
        with self._lock:
            self._closed = True
            self._db.close()
            if self._dir_lock is not None:
                self._dir_lock.release()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise IndexStoreError("the index store is closed")
