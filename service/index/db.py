"""SQLite side of the index: the durable record of every item (``items.sqlite``).

WAL journal with ``synchronous=FULL``: a committed transaction is fsynced before ``commit`` returns,
so an acknowledged add survives a crash or power cut. FAISS rows (``row``) are handed out from a
counter in ``meta`` and never reused, which lets a snapshot say "I hold every row up to N".
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

DB_FILE = "items.sqlite"
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    row INTEGER NOT NULL UNIQUE,
    vector BLOB NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    source TEXT,
    source_root TEXT,
    thumbnail BLOB,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class ItemDB:
    """One connection, used under the store's lock (``check_same_thread=False`` for that reason)."""

    def __init__(self, path: Path, migrate: bool = True):
        """``migrate=False``: leave an older file's columns as they are (for readers that may
        not hold the data dir's lock and read no source)."""
        self.path = path
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so a batch is one transaction.
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(_SCHEMA)
        if migrate:
            self._add_source_root()

    def _add_source_root(self) -> None:
        """Older files lack ``source_root``: their sources are names rebuild never opens."""
        columns = {r[1] for r in self.conn.execute("PRAGMA table_info(items)")}
        if "source_root" not in columns:
            try:
                self.conn.execute("ALTER TABLE items ADD COLUMN source_root TEXT")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc):
                    raise

    def close(self) -> None:
        self.conn.close()

    # ---- meta -------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    def set_meta(self, **values: object) -> None:
        with self._transaction():
            self._put_meta(values)

    def _put_meta(self, values: dict[str, object]) -> None:
        self.conn.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [(k, str(v)) for k, v in values.items()],
        )

    # ---- writes -----------------------------------------------------------------------------
    def _transaction(self):
        return _Tx(self.conn)

    def insert(
        self,
        ids: list[str],
        vectors: np.ndarray,
        metadata: list[str],
        sources: list[tuple[str | None, str | None]],
        thumbnails: list[bytes | None],
    ) -> np.ndarray:
        """Insert a batch in one fsynced transaction; returns the FAISS rows given to it.

        Raises ``sqlite3.IntegrityError`` (nothing written) when an id already exists.
        """
        now = utc_now()
        with self._transaction():
            next_row = int(self.meta().get("next_row", "0"))
            rows = np.arange(next_row, next_row + len(ids), dtype=np.int64)
            self.conn.executemany(
                "INSERT INTO items(id, row, vector, metadata, source, source_root, thumbnail, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (i, int(r), v.astype("<f4").tobytes(), m, s[0], s[1], t, now)
                    for i, r, v, m, s, t in zip(
                        ids, rows, vectors, metadata, sources, thumbnails, strict=True
                    )
                ],
            )
            self._put_meta({"next_row": next_row + len(ids)})
        return rows

    def delete(self, item_id: str) -> int | None:
        """Delete durably; returns the item's FAISS row, or None when the id is unknown."""
        with self._transaction():
            found = self.conn.execute("SELECT row FROM items WHERE id = ?", (item_id,)).fetchone()
            if found is None:
                return None
            self.conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
        return int(found[0])

    # ---- reads ------------------------------------------------------------------------------
    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def existing(self, ids: list[str]) -> list[str]:
        found: list[str] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found += [
                r[0]
                for r in self.conn.execute(f"SELECT id FROM items WHERE id IN ({marks})", chunk)
            ]
        return found

    def row_numbers(self) -> np.ndarray:
        rows = self.conn.execute("SELECT row FROM items ORDER BY row").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def get(self, item_id: str) -> tuple | None:
        return self.conn.execute(
            "SELECT id, metadata, source, source_root, created_at, thumbnail IS NOT NULL "
            "FROM items WHERE id = ?",
            (item_id,),
        ).fetchone()

    def page(self, offset: int, limit: int) -> list[tuple]:
        """Rows shaped like get(), newest first."""
        return self.conn.execute(
            "SELECT id, metadata, source, source_root, created_at, thumbnail IS NOT NULL "
            "FROM items ORDER BY row DESC LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()

    def thumbnail(self, item_id: str) -> bytes | None:
        found = self.conn.execute("SELECT thumbnail FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if found is None or found[0] is None else bytes(found[0])

    def vector(self, item_id: str) -> bytes | None:
        found = self.conn.execute("SELECT vector FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if found is None else bytes(found[0])

    def row_of(self, ids: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT id, row FROM items WHERE id IN ({marks})"
            out.update((i, int(r)) for i, r in self.conn.execute(sql, chunk))
        return out

    def describe_rows(self, rows: list[int]) -> dict[int, tuple[str, str]]:
        """row -> (id, metadata JSON) for search results."""
        out: dict[int, tuple[str, str]] = {}
        for start in range(0, len(rows), 500):
            chunk = rows[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT row, id, metadata FROM items WHERE row IN ({marks})"
            out.update((int(r), (i, m)) for r, i, m in self.conn.execute(sql, chunk))
        return out

    def iter_vectors(
        self, dim: int, after_row: int = -1, chunk: int = 4096
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows [n], vectors [n, dim]) in row order for rows > after_row, in chunks."""
        cursor = self.conn.execute(
            "SELECT row, vector FROM items WHERE row > ? ORDER BY row", (after_row,)
        )
        while batch := cursor.fetchmany(chunk):
            rows = np.fromiter((r for r, _ in batch), dtype=np.int64, count=len(batch))
            vecs = np.frombuffer(b"".join(v for _, v in batch), dtype="<f4").reshape(-1, dim)
            yield rows, vecs.astype(np.float32)

    def count_after(self, after_row: int) -> int:
        return self.conn.execute(
            "SELECT COUNT(*) FROM items WHERE row > ?", (after_row,)
        ).fetchone()[0]

    def iter_items(self) -> Iterator[tuple[str, str, str | None, str | None, bytes | None]]:
        """(id, metadata JSON, source, source_root, thumbnail) for every item, in row order."""
        yield from self.conn.execute(
            "SELECT id, metadata, source, source_root, thumbnail FROM items ORDER BY row"
        )


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
