"""IndexStore against real FAISS, real SQLite and real files (including a kill -9 mid-life)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from service.index import (
    DuplicateIdError,
    IndexModelMismatch,
    IndexStore,
    IndexStoreError,
    InvalidItemError,
    read_info,
)
from service.index.snapshot import SNAPSHOT_FILE

SHA = "a" * 64
OTHER_SHA = "b" * 64
DIM = 16
SMALL_IVF = {"nlist": 4, "nprobe": 4, "train_min": 40}


def vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float) -> np.ndarray:
    """A Gaussian mixture on the sphere: structured like real embeddings (unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))
    return points.astype(np.float32)


def open_store(path: Path, kind: str = "flat", **kw) -> IndexStore:
    params = SMALL_IVF if kind == "ivf" else {}
    return IndexStore.open(path, SHA, DIM, kind, progress=False, **{**params, **kw})


def top_ids(store: IndexStore, query: np.ndarray, k: int = 1, **kw) -> list[str]:
    return [hit.id for hit in store.search(query, k, **kw)[0]]


def test_add_get_search_delete(tmp_path: Path) -> None:
    x = vectors(50)
    with open_store(tmp_path) as store:
        ids = store.add(
            x,
            ids=[f"img-{i}" for i in range(50)],
            metadata=[{"n": i} for i in range(50)],
            sources=[f"/photos/{i}.jpg" for i in range(50)],
            thumbnails=[b"\xff\xd8jpeg"] + [None] * 49,
        )
        assert ids == [f"img-{i}" for i in range(50)] and len(store) == 50
        item = store.get("img-0")
        assert item is not None and item.metadata == {"n": 0} and item.has_thumbnail
        # A source without a root is only a name: answers never show a server path.
        assert item.source == "0.jpg" and item.created_at.endswith("Z")
        assert store.get("img-1").has_thumbnail is False and store.get("nope") is None
        assert store.thumbnail("img-0") == b"\xff\xd8jpeg" and store.thumbnail("img-1") is None
        stored = store.vector("img-3")
        np.testing.assert_allclose(stored, x[3] / np.linalg.norm(x[3]), rtol=1e-6)

        # Exact search, best first, cosine scores, batched queries.
        hits = store.search(x[:2], k=5)
        assert [h[0].id for h in hits] == ["img-0", "img-1"]
        assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)
        scores = [h.score for h in hits[0]]
        assert scores == sorted(scores, reverse=True)
        truth = np.argsort(-(x / np.linalg.norm(x, axis=1, keepdims=True)) @ stored)[:5]
        assert top_ids(store, x[3], 5) == [f"img-{i}" for i in truth]
        assert hits[1][0].metadata == {"n": 1}

        # Excluding the item itself (GET /similar).
        assert "img-3" not in top_ids(store, x[3], 5, exclude_ids=["img-3"])
        similar = store.similar("img-3", 4)
        assert [h.id for h in similar] == [f"img-{i}" for i in truth[1:5]]
        assert store.similar("nope", 3) is None

        assert store.delete("img-3") is True and store.delete("img-3") is False
        assert store.get("img-3") is None and store.vector("img-3") is None
        assert "img-3" not in top_ids(store, x[3], 50) and len(store) == 49
        page, total = store.list_items(offset=0, limit=3)
        assert total == 49 and [i.id for i in page] == ["img-49", "img-48", "img-47"]
        assert page[0].to_dict()["metadata"] == {"n": 49}

        generated = store.add(vectors(2, seed=1))
        assert all(len(i) == 32 and int(i, 16) >= 0 for i in generated)
        stats = store.stats()
        assert stats["count"] == 51 and stats["dim"] == DIM and stats["type"] == "flat"
        assert stats["model_sha256"] == SHA and stats["pending_since_snapshot"] == 53
    info = read_info(tmp_path)
    assert info["count"] == 51 and info["snapshot"]["count"] == 51


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["a/b"], "'/'"),
        ([""], "1 to 128"),
        (["x" * 129], "1 to 128"),
        (["tab\there"], "non-printable"),
        ([" padded"], "spaces"),
        ([7], "string"),
    ],
)
def test_bad_ids_are_refused(tmp_path: Path, ids: list, message: str) -> None:
    with open_store(tmp_path) as store:
        with pytest.raises(InvalidItemError, match=message):
            store.add(vectors(1), ids=ids)
        assert len(store) == 0


def test_duplicates_and_bad_input_write_nothing(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.add(vectors(2), ids=["a", "b"])
        with pytest.raises(DuplicateIdError, match="'b'") as err:
            store.add(vectors(2, seed=1), ids=["c", "b"])
        assert isinstance(err.value, ValueError) and err.value.ids == ["b"]
        with pytest.raises(DuplicateIdError, match="'d'"):
            store.add(vectors(2, seed=1), ids=["d", "d"])
        bad = [
            ({"metadata": ["not an object"]}, "JSON object"),
            ({"metadata": [{"blob": "x" * 20_000}]}, "limit"),
            ({"metadata": [{"f": float("nan")}]}, "JSON-serialisable"),
            ({"metadata": [{"s": {1, 2}}]}, "JSON-serialisable"),
            ({"sources": ["a", "b"]}, "2 sources for 1"),
            ({"thumbnails": ["text"]}, "bytes"),
        ]
        for kwargs, message in bad:
            with pytest.raises(InvalidItemError, match=message):
                store.add(vectors(1, seed=2), ids=["e"], **kwargs)
        for arr, message in [
            (np.zeros((1, DIM)), "all-zero"),
            (np.full((1, DIM), np.nan), "NaN"),
            (np.ones((1, DIM + 1)), rf"\[n, {DIM}\]"),
        ]:
            with pytest.raises(InvalidItemError, match=message):
                store.add(arr)
        with pytest.raises(InvalidItemError, match="positive integer"):
            store.search(vectors(1), k=0)
        assert len(store) == 2 and store.existing(["a", "b", "c", "d", "e"]) == {"a", "b"}
        assert store.get("c") is None


KILLED_WRITER = textwrap.dedent(
    """
    import json, os, signal, sys
    import numpy as np
    from service.index import IndexStore
    data_dir, kind, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    x = np.random.default_rng(0).normal(size=(120, 16)).astype(np.float32)
    store = IndexStore.open(data_dir, "a" * 64, 16, kind, progress=False, **params)
    store.add(x[:60], ids=[f"i{n}" for n in range(60)])
    store.snapshot()                   # a snapshot that later adds and deletes overtake
    for n in range(0, 10):
        assert store.delete(f"i{n}")
    store.add(x[60:], ids=[f"i{n}" for n in range(60, 120)])
    os.kill(os.getpid(), signal.SIGKILL)   # right after add() returned: no close, no snapshot
    """
)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_acknowledged_items_survive_kill_9(tmp_path: Path, kind: str) -> None:
    params = SMALL_IVF if kind == "ivf" else {}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path), kind, json.dumps(params)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    x = np.random.default_rng(0).normal(size=(120, DIM)).astype(np.float32)
    with open_store(tmp_path, kind) as store:
        assert len(store) == 110
        assert store.stats()["pending_since_snapshot"] == 70  # 60 replayed adds + 10 deletes
        for n in range(120):
            found = top_ids(store, x[n], 1)[0]
            assert found != f"i{n}" if n < 10 else found == f"i{n}"
        deleted = {f"i{n}" for n in range(10)}
        assert not deleted & {h.id for h in store.search(x[:10], 20)[0]}
        assert store.existing(deleted) == set()
    # The close above wrote a fresh snapshot; a third open needs no replay.
    with open_store(tmp_path, kind) as store:
        assert len(store) == 110 and store.stats()["pending_since_snapshot"] == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_snapshot_is_rebuilt_from_sqlite(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    x = vectors(30)
    with open_store(tmp_path) as store:
        store.add(x, ids=[f"i{n}" for n in range(30)])
    snap = tmp_path / SNAPSHOT_FILE
    raw = bytearray(snap.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"not a faiss file at all")
    snap.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="service.index"):
        store = open_store(tmp_path)
    assert "rebuilding from SQLite" in caplog.text
    with store:
        assert len(store) == 30
        assert all(top_ids(store, x[n]) == [f"i{n}"] for n in range(30))
    assert read_info(tmp_path)["snapshot"]["count"] == 30  # rewritten and valid again


def test_missing_snapshot_is_rebuilt(tmp_path: Path) -> None:
    x = vectors(20)
    with open_store(tmp_path) as store:
        store.add(x, ids=[f"i{n}" for n in range(20)])
    (tmp_path / SNAPSHOT_FILE).unlink()
    with open_store(tmp_path) as store:
        assert top_ids(store, x[7]) == ["i7"] and len(store) == 20


def test_other_model_is_refused_with_a_rebuild_command(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, SHA, DIM, model_name="vit-old", progress=False) as store:
        store.add(vectors(3))
    with pytest.raises(IndexModelMismatch) as err:
        IndexStore.open(tmp_path, OTHER_SHA, DIM, model_name="vit-new", progress=False)
    text = str(err.value)
    assert "'vit-old'" in text and SHA[:12] in text and OTHER_SHA[:12] in text
    assert f"python -m service.index rebuild --data-dir {tmp_path}" in text
    with pytest.raises(IndexModelMismatch, match="dim 32"):
        IndexStore.open(tmp_path, SHA, 32, progress=False)
    with open_store(tmp_path) as store:  # the right model still opens it
        assert len(store) == 3


def test_snapshots_are_periodic_and_index_type_can_change(tmp_path: Path) -> None:
    x = vectors(25)
    store = open_store(tmp_path, snapshot_every=10)
    for start in range(0, 25, 5):
        store.add(x[start : start + 5], ids=[f"i{n}" for n in range(start, start + 5)])
    assert read_info(tmp_path)["snapshot"]["count"] == 20  # taken at 10 and 20 adds
    assert store.stats()["pending_since_snapshot"] == 5
    store.close()
    store.close()  # idempotent
    with open_store(tmp_path, "hnsw") as store:  # a different type rebuilds from SQLite
        assert store.stats()["type"] == "hnsw" and len(store) == 25
        assert top_ids(store, x[4]) == ["i4"]
    assert read_info(tmp_path)["type"] == "hnsw"


def test_ivf_is_flat_until_enough_vectors(tmp_path: Path) -> None:
    x = vectors(60)
    with open_store(tmp_path, "ivf") as store:
        store.add(x[:30], ids=[f"i{n}" for n in range(30)])
        assert store.stats()["trained"] is False
        assert top_ids(store, x[5]) == ["i5"]
        store.add(x[30:], ids=[f"i{n}" for n in range(30, 60)])
        assert store.stats()["trained"] is True
        assert store.delete("i5") and len(store) == 59
        assert top_ids(store, x[6]) == ["i6"]
    with open_store(tmp_path, "ivf") as store:
        assert store.stats()["trained"] is True and len(store) == 59


def test_hnsw_tombstones_filter_and_rebuild(tmp_path: Path) -> None:
    x = vectors(40)
    with open_store(tmp_path, "hnsw") as store:
        store.add(x, ids=[f"i{n}" for n in range(40)])
        for n in range(8):
            store.delete(f"i{n}")
        assert store.stats()["tombstones"] == 8
        hits = store.search(x[:8], 10)
        assert all(h.id not in {f"i{n}" for n in range(8)} for row in hits for h in row)
        assert all(len(row) == 10 for row in hits)  # over-fetched past the tombstones
        store.snapshot()  # 8 of 40 dead > 10%: the graph is rebuilt without them
        assert store.stats()["tombstones"] == 0 and len(store) == 32


@pytest.mark.parametrize(
    ("kind", "params"),
    [("hnsw", {"hnsw_m": 16, "ef_search": 64}), ("ivf", {"nlist": 32, "nprobe": 8})],
)
def test_approximate_recall_on_clustered_data(tmp_path: Path, kind: str, params: dict) -> None:
    dim, n, k = 32, 3000, 10
    # Overlapping clusters: weak settings (hnsw_m=4, ef_search=10; nprobe=1) score 0.79-0.91 here.
    points = clustered(n + 100, dim, clusters=40, seed=0, spread=1.0)
    data, queries = points[:n], points[n:]  # queries: held-out draws from the same mixture
    ids = [f"v{i}" for i in range(n)]
    exact = IndexStore.open(tmp_path / "flat", SHA, dim, progress=False)
    approx = IndexStore.open(tmp_path / kind, SHA, dim, kind, progress=False, **params)
    with exact, approx:
        for start in range(0, n, 500):  # in batches, as a server would add them
            exact.add(data[start : start + 500], ids=ids[start : start + 500])
            approx.add(data[start : start + 500], ids=ids[start : start + 500])
        if kind == "ivf":
            assert approx.stats()["trained"] is True
        truth = exact.search(queries, k)
        found = approx.search(queries, k)
    recall = np.mean(
        [len({h.id for h in f} & {h.id for h in t}) / k for f, t in zip(found, truth, strict=True)]
    )
    assert recall >= 0.9, f"{kind} recall@{k} = {recall:.3f}"


def test_concurrent_adds_and_searches(tmp_path: Path) -> None:
    x = vectors(160, seed=3)
    with open_store(tmp_path) as store:

        def worker(w: int) -> int:
            for b in range(4):
                start = w * 20 + b * 5
                store.add(x[start : start + 5], ids=[f"w{w}-{start + j}" for j in range(5)])
                assert len(store.search(x[start], 3)[0]) >= 1
            return w

        with ThreadPoolExecutor(8) as pool:
            assert sorted(pool.map(worker, range(8))) == list(range(8))
        assert len(store) == 160
        assert top_ids(store, x[77]) == ["w3-77"]


def test_snapshot_write_is_atomic(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.add(vectors(5))
        store.snapshot()
        leftovers = [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
        assert leftovers == []
        assert os.path.getsize(tmp_path / SNAPSHOT_FILE) > 0


def test_one_process_per_data_dir(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(IndexStoreError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
        open_store(tmp_path)
    store.close()
    with open_store(tmp_path) as again:  # released on close
        assert len(again) == 0
