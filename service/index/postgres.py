"""The shared index backend: PostgreSQL + pgvector at ``DINO_INDEX_URL``; same API as
``IndexStore`` (see ``service.index.backend``).

The server process keeps no index state: every call is one transaction on the database, so any
number of replicas on one URL see each other's writes at once, and an add or delete returns only
after its transaction has committed (PostgreSQL's default ``synchronous_commit`` makes that
durable). Searches use the HNSW index with pgvector 0.8's iterative scans
(``hnsw.iterative_scan = relaxed_order``), so a filter or an excluded id does not starve the
results; a query still short of k (fewer matches than the scan reached) is answered exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import numpy as np
import psycopg

from service.index import validate as v
from service.index.db import utc_now
from service.index.errors import DuplicateIdError, IndexStoreError, InvalidItemError
from service.index.filters import check_filter, pg_containment
from service.index.pg_pool import IndexUnavailable, Pool, redact
from service.index.pg_schema import ITEMS, pg_params, setup
from service.index.store import Hit, Item

log = logging.getLogger(__name__)
T = TypeVar("T")
_ITEM_COLS = "id, metadata, source, created_at, thumbnail IS NOT NULL"
# A filter matching at most this many rows is answered exactly: the iterative HNSW scan returns
# the first k matches it meets, which for a rare label are far from the best k (recall 0.36 at
# 1% of 5k items, measured), while sorting a few thousand rows costs about one HNSW query.
EXACT_MAX = 4096


def _item(row: tuple) -> Item:
    iid, meta, source, created, has_thumb = row
    return Item(iid, meta, source, created, bool(has_thumb))


class PgStore:
    """Use :meth:`open`."""

    def __init__(self, pool: Pool, meta: dict[str, str], dim: int, params: dict[str, int]):
        self._pool = pool
        self.dim = dim
        self.model_sha256 = meta["model_sha256"]
        self.model_name = meta.get("model_name") or None
        self.params = params
        self.where = redact(pool.url)
        self.cached_len: int | None = None  # the last count seen, for /metrics

    @classmethod
    def open(
        cls,
        url: str,
        model_sha256: str,
        dim: int,
        *,
        model_name: str | None = None,
        pool_size: int = 8,
        transform: str = "none",
        **params: object,
    ) -> PgStore:
        """Connect, create what is missing, check the model. ``ValueError`` for a bad URL or
        parameter, ``IndexUnavailable`` when the database cannot be reached,
        ``IndexModelMismatch`` when it holds another model's vectors."""
        chosen = pg_params(dict(params))
        pool = Pool(url, pool_size, (f"SET hnsw.ef_search = {int(chosen['ef_search'])}",))
        try:
            with pool.connection() as conn:
                meta = setup(conn, redact(url), model_sha256, dim, model_name, chosen, transform)
        except BaseException:
            pool.close()
            raise
        pool.drop_idle()  # connections opened before the extension existed lack its types
        store = cls(pool, meta, dim, chosen)
        log.info(
            "index: PostgreSQL %s, %d items, model %s",
            store.where,
            len(store),
            meta["model_sha256"][:12],
        )
        return store

    # ---- plumbing ---------------------------------------------------------------------------
    def _read(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run a read; once more on a fresh connection if a stale one failed (database restart)."""
        try:
            with self._pool.connection() as conn:
                return work(conn)
        except IndexUnavailable:
            with self._pool.connection() as conn:
                return work(conn)

    # ---- writes -----------------------------------------------------------------------------
    def add(
        self,
        vectors: np.ndarray,
        ids: Sequence[str] | None = None,
        metadata: Sequence[dict | None] | None = None,
        sources: Sequence[str | None] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        source_roots: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Add items in one transaction; returns their ids once it has committed. A database
        index is never rebuilt from its sources, so only the path below a build's root (or an
        upload's file name) is kept: no server path reaches the shared table."""
        vecs = v.as_unit_rows(vectors, self.dim)
        n = len(vecs)
        ids = v.check_ids(ids, n)
        metas = [v.metadata_json(m) for m in v.per_item(metadata, n, "metadata")]
        pairs = zip(
            v.per_item(sources, n, "sources"),
            v.per_item(source_roots, n, "source_roots"),
            strict=True,
        )
        srcs = [v.shown_source(*v.check_source(s, r)) for s, r in pairs]
        thumbs = [v.check_thumbnail(t) for t in v.per_item(thumbnails, n, "thumbnails")]
        if n == 0:
            return []
        now = utc_now()
        rows = [
            (i, vec, m, s, t, now)
            for i, vec, m, s, t in zip(ids, vecs, metas, srcs, thumbs, strict=True)
        ]
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {ITEMS} (id, embedding, metadata, source, thumbnail, created_at) "
                    "VALUES (%s, %s, %s::jsonb, %s, %s, %s)",
                    rows,
                )
        except psycopg.errors.UniqueViolation:
            taken = self.existing(ids)
            raise DuplicateIdError(sorted(taken) or sorted(set(ids))) from None
        except psycopg.DataError as exc:  # e.g. a NUL character, which PostgreSQL text refuses
            raise InvalidItemError(
                f"the database refused the items: {exc}".splitlines()[0]
            ) from None
        return ids

    def delete(self, item_id: str) -> bool:
        """Delete in one committed transaction; False when the id is unknown."""
        with self._pool.connection() as conn:
            cur = conn.execute(f"DELETE FROM {ITEMS} WHERE id = %s", (item_id,))
            return cur.rowcount > 0

    # ---- reads ------------------------------------------------------------------------------
    def get(self, item_id: str) -> Item | None:
        row = self._read(
            lambda c: c.execute(
                f"SELECT {_ITEM_COLS} FROM {ITEMS} WHERE id = %s", (item_id,)
            ).fetchone()
        )
        return None if row is None else _item(row)

    def list_items(self, offset: int = 0, limit: int = 50) -> tuple[list[Item], int]:
        def work(c: psycopg.Connection) -> tuple[list[Item], int]:
            rows = c.execute(
                f"SELECT {_ITEM_COLS} FROM {ITEMS} ORDER BY seq DESC LIMIT %s OFFSET %s",
                (limit, offset),
            ).fetchall()
            return [_item(r) for r in rows], c.execute(f"SELECT count(*) FROM {ITEMS}").fetchone()[
                0
            ]

        return self._read(work)

    def thumbnail(self, item_id: str) -> bytes | None:
        row = self._read(
            lambda c: c.execute(
                f"SELECT thumbnail FROM {ITEMS} WHERE id = %s", (item_id,)
            ).fetchone()
        )
        return None if row is None or row[0] is None else bytes(row[0])

    def vector(self, item_id: str) -> np.ndarray | None:
        return self._read(lambda c: self._vector(c, item_id))

    def _vector(self, conn: psycopg.Connection, item_id: str) -> np.ndarray | None:
        row = conn.execute(f"SELECT embedding FROM {ITEMS} WHERE id = %s", (item_id,)).fetchone()
        if row is None:
            return None
        vec = row[0]
        return np.asarray(vec.to_numpy() if hasattr(vec, "to_numpy") else vec, dtype=np.float32)

    def existing(self, ids: Iterable[str]) -> set[str]:
        ids = list(ids)
        if not ids:
            return set()
        rows = self._read(
            lambda c: c.execute(f"SELECT id FROM {ITEMS} WHERE id = ANY(%s)", (ids,)).fetchall()
        )
        return {r[0] for r in rows}

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and bool(self.existing([item_id]))

    def __len__(self) -> int:
        count = self._read(lambda c: c.execute(f"SELECT count(*) FROM {ITEMS}").fetchone()[0])
        self.cached_len = count
        return count

    def health(self) -> str | None:
        """None when the database answers, else why not (for /readyz)."""
        try:
            self._read(lambda c: c.execute("SELECT 1").fetchone())
        except IndexStoreError as exc:
            return str(exc)
        return None

    # ---- search -----------------------------------------------------------------------------
    def search(
        self,
        query: np.ndarray,
        k: int = 10,
        exclude_ids: Iterable[str] | None = None,
        filter: dict | None = None,
    ) -> list[list[Hit]]:
        """The contract of ``IndexStore.search``, each query ranked by pgvector in the database."""
        k = v.check_k(k)
        queries = v.as_unit_rows(query, self.dim, "query")
        flt = check_filter(filter)
        exclude = list(exclude_ids or [])
        return self._read(lambda c: [self._nearest(c, q, k, exclude, flt) for q in queries])

    def similar(self, item_id: str, k: int = 10, filter: dict | None = None) -> list[Hit] | None:
        """The contract of ``IndexStore.similar``, ranked in the database from the stored vector."""
        k = v.check_k(k)
        flt = check_filter(filter)

        def work(c: psycopg.Connection) -> list[Hit] | None:
            vec = self._vector(c, item_id)
            return None if vec is None else self._nearest(c, vec, k, [item_id], flt)

        return self._read(work)

    def _nearest(
        self, conn: psycopg.Connection, q: np.ndarray, k: int, exclude: list[str], flt: dict | None
    ) -> list[Hit]:
        where, args = ["TRUE"], []
        if flt:
            where.append("metadata @> %s::jsonb")
            args.append(pg_containment(flt))
        if exclude:
            where.append("id <> ALL(%s)")
            args.append(exclude)
        cond = " AND ".join(where)
        if flt and self._few(conn, cond, args):  # a rare label: exact over its rows (GIN)
            return self._exact(conn, q, k, cond, args)
        ef = max(self.params["ef_search"], k)
        conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef),))
        conn.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")
        rows = conn.execute(
            f"SELECT id, metadata, embedding <#> %s FROM {ITEMS} WHERE {cond} "
            "ORDER BY embedding <#> %s LIMIT %s",
            [q, *args, q, k],
        ).fetchall()
        if len(rows) < k:  # the scan gave up before k matches: scan the matching rows exactly
            return self._exact(conn, q, k, cond, args)
        hits = [Hit(i, -float(d), m) for i, m, d in rows]
        return sorted(hits, key=lambda h: -h.score)  # relaxed_order: near, not strict, order

    def _few(self, conn: psycopg.Connection, cond: str, args: list) -> bool:
        """At most EXACT_MAX rows match (counted through the GIN index, stopping early)."""
        sql = f"SELECT count(*) FROM (SELECT 1 FROM {ITEMS} WHERE {cond} LIMIT %s) AS m"
        return conn.execute(sql, [*args, EXACT_MAX + 1]).fetchone()[0] <= EXACT_MAX

    def _exact(
        self, conn: psycopg.Connection, q: np.ndarray, k: int, cond: str, args: list
    ) -> list[Hit]:
        rows = conn.execute(
            f"WITH m AS MATERIALIZED (SELECT id, metadata, embedding FROM {ITEMS} "
            f"WHERE {cond}) "
            "SELECT id, metadata, embedding <#> %s AS d FROM m ORDER BY d LIMIT %s",
            [*args, q, k],
        ).fetchall()
        return [Hit(i, -float(d), m) for i, m, d in rows]

    # ---- the rest of the API ----------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "count": len(self),
            "dim": self.dim,
            "type": "pgvector-hnsw",
            "backend": "postgres",
            "model_sha256": self.model_sha256,
            "model_name": self.model_name,
            "database": self.where,
            "params": dict(self.params),
        }

    def snapshot(self) -> None:
        """Nothing to do: the database is the only copy."""

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe(url: str) -> dict:
    """What an index database holds, without a model (``python -m service.index stats``)."""
    from service.index.pg_schema import META

    pool = Pool(url, 1)
    try:
        with pool.connection() as conn:
            found = conn.execute("SELECT to_regclass(%s), to_regclass(%s)", (META, ITEMS))
            if None in found.fetchone():
                raise IndexStoreError(f"no index in {redact(url)} yet; build one first")
            meta = dict(conn.execute(f"SELECT key, value FROM {META}").fetchall())
            count = conn.execute(f"SELECT count(*) FROM {ITEMS}").fetchone()[0]
    finally:
        pool.close()
    return {
        "database": redact(url),
        "count": count,
        "dim": int(meta["dim"]),
        "type": "pgvector-hnsw",
        "model_sha256": meta.get("model_sha256"),
        "model_name": meta.get("model_name") or None,
        "created_at": meta.get("created_at"),
        "params": {k: int(meta[k]) for k in ("m", "ef_construction") if k in meta},
    }
