"""kill -9 a live server at random moments while clients add items: after every restart each
acknowledged (201) item is present and searchable, and no index file is corrupt."""

from __future__ import annotations

import io
import random
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import Server
from PIL import Image
from reliability import record

from service.index.db import DB_FILE
from service.index.snapshot import SNAPSHOT_FILE, read_snapshot

CYCLES = 5
WRITERS = 3


def unique_png(seed: int) -> bytes:
    """A distinct small image per item, so a search by its pixels must find that very item."""
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def seed_of(item_id: str) -> int:
    cycle, writer, n = (int(part) for part in item_id.split("-"))
    return cycle * 1_000_000 + writer * 10_000 + n


def add_until_killed(url: str, cycle: int, writer: int, acked: list[str], sent: list[int]):
    """POST /items one image at a time; keep the ids the server acknowledged with 201."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for n in range(10_000):
            item_id = f"{cycle}-{writer}-{n}"
            try:
                sent.append(1)
                response = client.post(
                    "/items",
                    files={"images": (f"{item_id}.png", unique_png(seed_of(item_id)))},
                    data={"ids": item_id, "metadata": f'{{"n": {n}}}'},
                )
            except httpx.TransportError:
                return  # killed mid-request: this one is unknown, not acknowledged
            assert response.status_code == 201, response.text
            acked.append(item_id)


def check_files(data_dir: Path) -> None:
    """SQLite passes its integrity check; the FAISS snapshot, if any, passes its checksum."""
    with sqlite3.connect(data_dir / DB_FILE) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    if (data_dir / SNAPSHOT_FILE).exists():
        read_snapshot(data_dir / SNAPSHOT_FILE)  # raises SnapshotError when corrupt
    leftovers = [p.name for p in data_dir.iterdir() if ".tmp" in p.name]
    assert not leftovers or all(p.startswith(".index.faiss.tmp") for p in leftovers), leftovers


def verify(url: str, acked: list[str], rng: random.Random) -> int:
    """Every acknowledged item is there; a sample is found by id and by its own pixels."""
    with httpx.Client(base_url=url, timeout=30) as client:
        count = client.get("/index").json()["count"]
        assert count >= len(acked), (count, len(acked))
        for item_id in acked:
            got = client.get(f"/items/{item_id}")
            assert got.status_code == 200, (item_id, got.text)
            assert got.json()["metadata"] == {"n": int(item_id.split("-")[2])}
        for item_id in rng.sample(acked, min(8, len(acked))):
            near = client.get("/similar", params={"id": item_id, "k": 3})
            assert near.status_code == 200, near.text
            by_pixels = client.post(
                "/similar", files={"image": ("q.png", unique_png(seed_of(item_id)))}, data={"k": 1}
            ).json()["results"]
            assert by_pixels[0]["id"] == item_id and by_pixels[0]["score"] > 0.999
    return count


@pytest.mark.slow
def test_acknowledged_items_survive_random_kill_9(tiny_vit_dir, tmp_path):
    rng = random.Random(7)
    data_dir = tmp_path / "data"
    acked: list[str] = []
    sent: list[int] = []
    kills = 0
    final = None
    for cycle in range(CYCLES + 1):
        server = Server(tiny_vit_dir, data_dir, tmp_path / f"server{cycle}.log")
        try:
            server.wait_ready()
            count = verify(server.url, acked, rng)
            if cycle == CYCLES:
                final = count
                assert server.stop() in (0, -15)
                break
            writers = [
                threading.Thread(target=add_until_killed, args=(server.url, cycle, w, acked, sent))
                for w in range(WRITERS)
            ]
            for thread in writers:
                thread.start()
            time.sleep(rng.uniform(0.3, 2.0))  # a random moment in the stream of writes
            server.kill9()
            kills += 1
            for thread in writers:
                thread.join(30)
                assert not thread.is_alive()
        finally:
            if server.proc.poll() is None:
                server.kill9()
        check_files(data_dir)
        assert "not usable" not in server.output(), server.output()[-3000:]
    assert kills == CYCLES and len(acked) > 20, (kills, len(acked))
    record(
        "crash_kill_9",
        {
            "cycles": CYCLES,
            "crashes_survived": kills,
            "requests_sent": len(sent),
            "items_acknowledged": len(acked),
            "items_lost": 0,  # verify() above asserts every acknowledged item is present
            "items_in_index_at_end": final,
        },
    )
