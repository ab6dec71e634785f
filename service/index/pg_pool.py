"""Connections to the index database: URL checks, a small pool, and errors the server can map.

Every connection has a connect timeout and TCP keepalives, so an unreachable database is an
``IndexUnavailable`` (HTTP 503 with Retry-After) within seconds, never a hang. A failed
connection is thrown away along with every idle one (after a database restart they are all
dead), so the next request opens fresh ones: the server recovers by itself.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
from pgvector.psycopg import register_vector
from psycopg.conninfo import conninfo_to_dict

from service.index.errors import IndexStoreError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 30_000
SCHEMES = ("postgresql", "postgres")


class IndexUnavailable(IndexStoreError):
    """The index database cannot be reached right now (the server answers 503 and retries)."""


def check_url(url: str) -> dict[str, str]:
    """The parsed connection parameters, or a ``ValueError`` a person can act on."""
    try:
        scheme = urlsplit(url).scheme if "://" in url else ""
    except ValueError as exc:
        raise ValueError(f"DINO_INDEX_URL is not a valid URL: {exc}") from None
    if scheme not in SCHEMES:
        raise ValueError(
            "DINO_INDEX_URL must be a PostgreSQL URL such as "
            f"postgresql://user:password@host:5432/dbname, got scheme {scheme or 'none'!r}"
        )
    try:
        return conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ValueError(f"DINO_INDEX_URL is not a valid PostgreSQL URL: {exc}") from None


def redact(url: str) -> str:
    """The URL without its password (for logs, errors and /index)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an invalid URL)"
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class Pool:
    """Up to ``size`` connections, opened on demand; ``connection()`` yields one in a
    transaction that commits when the block ends."""

    def __init__(self, url: str, size: int = 8, session_sql: tuple[str, ...] = ()) -> None:
        check_url(url)
        self.url = url
        self.size = size
        self.session_sql = session_sql
        self._idle: queue.LifoQueue[psycopg.Connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    def _open(self) -> psycopg.Connection:
        conn = psycopg.connect(
            self.url,
            connect_timeout=CONNECT_TIMEOUT_S,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            application_name="dino-feature-service",
        )
        try:
            conn.execute("SET search_path TO public")
            for sql in self.session_sql:
                conn.execute(sql)
            with contextlib.suppress(psycopg.ProgrammingError):  # no extension yet: setup adds it
                register_vector(conn)
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def drop_idle(self) -> None:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            conn.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        if self._closed:
            raise IndexStoreError("the index store is closed")
        if not self._slots.acquire(timeout=CONNECT_TIMEOUT_S * 4):
            raise IndexUnavailable("all index database connections are busy; retry shortly")
        conn = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._open()
            with conn.transaction():
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self.drop_idle()
            if conn is not None:
                conn.close()
                conn = None
            raise IndexUnavailable(
                f"the index database is unreachable: {_first_line(exc)}"
            ) from exc
        except BaseException:
            if conn is not None and (conn.broken or conn.closed):
                conn = None
            raise
        finally:
            if conn is not None and not conn.closed and not self._closed:
                self._idle.put(conn)
            elif conn is not None:
                conn.close()
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        self.drop_idle()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
