"""Stateless replicas: live ``python -m service`` processes on one PostgreSQL database (a real
server from ``pg_fixture``): shared writes, ``kill -9`` during adds, the database going away and
coming back under a running replica."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from live_server import Server
from service_helpers import photo_bytes

pytestmark = pytest.mark.slow


def replica(model_dir, tmp_path, name: str, url: str) -> Server:
    server = Server(
        model_dir, tmp_path / f"{name}-data", tmp_path / f"{name}.log", {"DINO_INDEX_URL": url}
    )
    server.wait_ready()
    return server


def add(server: Server, ids: list[str], label: str = "x") -> httpx.Response:
    files = [("images", (f"{i}.jpg", photo_bytes(n))) for n, i in enumerate(ids)]
    data = {"ids": ids, "metadata": f'{{"label": "{label}"}}'}
    return httpx.post(f"{server.url}/items", files=files, data=data, timeout=30)


def test_two_replicas_share_one_database(tiny_vit_dir, tmp_path, pg_url):
    a = replica(tiny_vit_dir, tmp_path, "a", pg_url)
    b = replica(tiny_vit_dir, tmp_path, "b", pg_url)
    try:
        assert add(a, ["one", "two", "three"]).status_code == 201
        found = httpx.get(f"{b.url}/similar", params={"id": "one", "k": 5}).json()["results"]
        assert sorted(r["id"] for r in found) == ["three", "two"]
        query = {"image": ("q.jpg", photo_bytes(1))}
        top = httpx.post(f"{b.url}/similar", files=query, data={"k": 1}).json()["results"][0]
        assert top["id"] == "two" and top["score"] > 0.999

        assert httpx.delete(f"{b.url}/items/two").status_code == 204
        assert httpx.get(f"{a.url}/items/two").status_code == 404
        after = httpx.get(f"{a.url}/similar", params={"id": "one", "k": 5}).json()["results"]
        assert [r["id"] for r in after] == ["three"]
        assert httpx.get(f"{a.url}/index").json()["count"] == 2
        assert httpx.get(f"{b.url}/readyz").json()["index_size"] == 2
    finally:
        a.stop()
        b.stop()


def test_kill_9_during_adds_loses_no_acknowledged_item(tiny_vit_dir, tmp_path, pg_url):
    a = replica(tiny_vit_dir, tmp_path, "a", pg_url)
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer(worker: int) -> None:
        n = 0
        while not stop.is_set():
            item = f"w{worker}-{n}"
            try:
                if add(a, [item]).status_code == 201:
                    acknowledged.append(item)
            except httpx.TransportError:
                return  # the replica died mid-request: not acknowledged
            n += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    a.kill9()  # requests are in flight
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acknowledged) >= 12

    b = replica(tiny_vit_dir, tmp_path, "b", pg_url)
    try:
        for item in acknowledged:
            assert httpx.get(f"{b.url}/items/{item}").status_code == 200, item
        assert httpx.get(f"{b.url}/index").json()["count"] >= len(acknowledged)
    finally:
        b.stop()


def test_database_down_and_back_under_a_running_replica(tiny_vit_dir, tmp_path, pg_server):
    url = pg_server.create_database()
    a = replica(tiny_vit_dir, tmp_path, "a", url)
    try:
        assert add(a, ["kept"]).status_code == 201
        pg_server.stop()
        try:
            for request in (
                lambda: httpx.get(f"{a.url}/similar", params={"id": "kept"}, timeout=30),
                lambda: httpx.get(f"{a.url}/items", timeout=30),
                lambda: add(a, ["lost"]),
            ):
                down = request()
                assert down.status_code == 503, down.text
                assert "unreachable" in down.json()["detail"] and down.headers["Retry-After"]
            ready = httpx.get(f"{a.url}/readyz", timeout=30)
            assert ready.status_code == 503 and "unreachable" in ready.json()["detail"]
            files = {"images": ("e.jpg", photo_bytes(0))}
            assert httpx.post(f"{a.url}/embed", files=files, timeout=30).status_code == 200
        finally:
            pg_server.start()
        assert pg_server.server.get_uri() == pg_server.admin_url  # the same socket as before
        deadline = time.monotonic() + 30
        while httpx.get(f"{a.url}/readyz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the replica did not recover"
            time.sleep(0.2)
        assert httpx.get(f"{a.url}/items/kept").status_code == 200
        assert httpx.get(f"{a.url}/items/lost").status_code == 404
        assert add(a, ["after"]).status_code == 201
        assert a.proc.poll() is None  # the same process throughout
    finally:
        a.stop()


def test_bad_index_urls_fail_fast_with_a_reason(tiny_vit_dir, tmp_path, pg_url):
    bad = Server(
        tiny_vit_dir, tmp_path / "d", tmp_path / "bad.log", {"DINO_INDEX_URL": "mysql://x/y"}
    )
    assert bad.proc.wait(60) != 0
    assert "DINO_INDEX_URL must be a PostgreSQL URL" in bad.output()

    # Nothing listens on port 1: the replica starts, /embed works, the index says why it is not.
    nowhere = "postgresql://u@127.0.0.1:1/db?connect_timeout=2"
    far = Server(tiny_vit_dir, tmp_path / "e", tmp_path / "far.log", {"DINO_INDEX_URL": nowhere})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"{far.url}/readyz", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and far.proc.poll() is None, far.output()
                time.sleep(0.2)
        assert ready.status_code == 503 and "unreachable" in ready.json()["detail"]
        items = httpx.get(f"{far.url}/items", timeout=5)
        assert items.status_code == 503 and "Retry-After" in items.headers
        files = {"images": ("e.jpg", photo_bytes(0))}
        assert httpx.post(f"{far.url}/embed", files=files, timeout=30).status_code == 200
    finally:
        far.stop()
