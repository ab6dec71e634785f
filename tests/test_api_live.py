"""A live ``python -m service`` (uvicorn) process: acknowledged writes survive ``kill -9``, and an
index built by another model is refused at start."""

from __future__ import annotations

import signal

import httpx
import pytest
from live_server import Server
from service_helpers import photo_bytes


@pytest.mark.slow
def test_acknowledged_writes_survive_kill_9_and_another_model_is_refused(
    tiny_vit_dir, tiny_resnet_dir, tmp_path
):
    data_dir = tmp_path / "data"
    blobs = [photo_bytes(i) for i in range(3)]

    first = Server(tiny_vit_dir, data_dir, tmp_path / "first.log")
    try:
        first.wait_ready()
        added = httpx.post(
            f"{first.url}/items",
            files=[("images", (f"{i}.jpg", b)) for i, b in enumerate(blobs)],
            data={"ids": ["a", "b", "gone"], "metadata": '{"from": "first"}'},
            timeout=30,
        )
        assert added.status_code == 201, added.text
        assert httpx.delete(f"{first.url}/items/gone", timeout=30).status_code == 204
    finally:
        first.kill9()  # no shutdown hook runs: no snapshot, no clean close
    assert first.proc.returncode == -signal.SIGKILL
    assert "POST /items 201" in first.output()  # the per-request log line, with its timing

    second = Server(tiny_vit_dir, data_dir, tmp_path / "second.log")
    try:
        second.wait_ready()
        assert httpx.get(f"{second.url}/items/a").json()["metadata"] == {"from": "first"}
        assert httpx.get(f"{second.url}/items/gone").status_code == 404
        assert httpx.get(f"{second.url}/index").json()["count"] == 2
        found = httpx.post(
            f"{second.url}/similar", files={"image": ("q.jpg", blobs[1])}, data={"k": 2}
        ).json()["results"]
        assert [r["id"] for r in found] == ["b", "a"] and found[0]["score"] > 0.999
        by_id = httpx.get(f"{second.url}/similar", params={"id": "a"}).json()["results"]
        assert [r["id"] for r in by_id] == ["b"]
    finally:
        second.proc.send_signal(signal.SIGTERM)
        second.proc.wait(30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM for the parent to see.
    assert second.proc.returncode in (0, -signal.SIGTERM), second.output()
    started = second.output()
    assert "Application shutdown complete" in started
    assert "serving model tiny-vit" in started and "2 items" in started
    assert "sha256" in started

    other = Server(tiny_resnet_dir, data_dir, tmp_path / "other.log")
    try:
        other.proc.wait(60)
    finally:
        if other.proc.poll() is None:
            other.kill9()
    assert other.proc.returncode != 0
    message = other.output()
    assert "was built by model 'tiny-vit'" in message and "tiny-resnet" in message
    assert "python -m service.index rebuild" in message
