"""``python -m service.index`` against a PostgreSQL index (a real server from ``pg_fixture``)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from live_server import ROOT

from service.index.postgres import PgStore


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.index", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_stats_describes_the_database_and_rebuild_points_elsewhere(pg_url):
    empty = cli("stats", "--index-url", pg_url)
    assert empty.returncode == 2 and "no index in" in empty.stderr
    with PgStore.open(pg_url, "e" * 64, 8, model_name="m8", ef_search=100) as store:
        store.add(np.eye(8, dtype=np.float32)[:3], ids=["a", "b", "c"])
    stats = cli("stats", "--index-url", pg_url)
    assert stats.returncode == 0, stats.stderr
    info = json.loads(stats.stdout)
    assert info["count"] == 3 and info["dim"] == 8 and info["model_name"] == "m8"
    assert info["type"] == "pgvector-hnsw" and info["params"] == {"m": 16, "ef_construction": 64}
    rebuilt = cli("rebuild", "--index-url", pg_url)
    assert rebuilt.returncode == 2 and "build --index-url NEW_URL" in rebuilt.stderr
    bad = cli("stats", "--index-url", "postgresql://[::1")
    assert bad.returncode == 2 and "not a valid URL" in bad.stderr


def test_parameters_that_do_not_apply_to_pgvector_are_refused(pg_url):
    import pytest

    from service.index import IndexStoreError
    from service.index.factory import open_index
    from service.settings import Settings

    settings = Settings(index_url=pg_url, index_params={"nlist": 64}, _env_file=None)
    with pytest.raises(IndexStoreError, match="'nlist' does not apply to PostgreSQL"):
        open_index(settings, "e" * 64, 8)
    settings = Settings(index_url=pg_url, index_params={"m": 32, "ef_construction": 40})
    with pytest.raises(IndexStoreError, match="ef_construction >= 2 \\* m"):
        open_index(settings, "e" * 64, 8)
