"""Memory per request: a few KB of upload must not make a server hold GBs. A 6000 x 6000 16-bit
PNG (84 KB) once took a live server from 272 to 1,490 MB, and 64 of them in one request kept every
decoded image. Now images are checked header-first against per-image and per-request pixel
limits, decoded one at a time into the model's input, inside a server-wide budget (503 with
Retry-After when it stays spent). Also: every 503 carries DINO_RETRY_AFTER_S, and request-path
guards are real checks that ``python -O`` keeps."""

from __future__ import annotations

import ast
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
from live_server import ROOT, Server
from PIL import Image
from service_helpers import encode, photo_bytes, random_rgb, serve, settings_for

from service import routes_common
from service.app import create_app
from service.runtime import NotReady, Runtime

MB = 2**20


def grey16_png(side: int) -> bytes:
    ramp = np.linspace(0, 65535, side).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(out, "PNG", compress_level=9)
    return out.getvalue()


def peak_rss_after(pid: int, action) -> tuple[float, object]:
    """Growth of the process's peak RSS (VmHWM, reset first) while ``action`` runs."""
    status = Path(f"/proc/{pid}/status")

    def read(key: str) -> float:
        line = next(x for x in status.read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) * 1024

    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = read("VmRSS:")
    result = action()
    return read("VmHWM:") - before, result


@pytest.fixture(scope="module")
def live(tiny_vit_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory")
    server = Server(tiny_vit_dir, tmp / "data", tmp / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_huge_16bit_pngs_cost_a_bounded_amount_of_memory(live):
    body = grey16_png(6000)
    assert len(body) < 200_000  # a small upload, 36 million pixels

    def embed(n: int) -> httpx.Response:
        files = [("images", (f"{i}.png", body)) for i in range(n)]
        return httpx.post(f"{live.url}/embed", files=files, timeout=300)

    grown, one = peak_rss_after(live.proc.pid, lambda: embed(1))
    assert one.status_code == 200, one.text
    # 36 MP decoded: ~200 MB (uint16, then 8-bit grey, then RGB); 1.2 GB with float64 copies.
    assert grown < 500 * MB, f"peak RSS grew {grown / MB:.0f} MB"
    grown, many = peak_rss_after(live.proc.pid, lambda: embed(64))
    assert many.status_code == 413, many.text
    assert "DINO_MAX_REQUEST_PIXELS" in many.json()["detail"]
    assert grown < 100 * MB, f"refused from the headers, yet RSS grew {grown / MB:.0f} MB"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_a_spent_decoding_budget_is_503_with_retry_after(tiny_vit_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(routes_common, "DECODE_WAIT_S", 0.2)
    settings = settings_for(tiny_vit_dir, tmp_path, retry_after_s=7)
    files = [("images", ("a.jpg", photo_bytes(0)))]
    async with serve(settings) as client:
        budget = client._transport.app.state.runtime.decode_budget
        assert budget.try_acquire(settings.max_decode_pixels)  # other requests decoding
        busy = await client.post("/embed", files=files)
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"] == "7"
        assert "DINO_MAX_DECODE_PIXELS" in busy.json()["detail"]
        budget.release(settings.max_decode_pixels)
        assert (await client.post("/embed", files=files)).status_code == 200
        assert budget.used == 0  # every path gives its pixels back


@pytest.mark.anyio
async def test_the_per_request_limit_counts_every_image_before_decoding(tiny_vit_dir, tmp_path):
    settings = settings_for(tiny_vit_dir, tmp_path, max_request_pixels=3 * 96 * 72)
    async with serve(settings) as client:
        jpegs = [encode(Image.fromarray(random_rgb(i, (96, 72)))) for i in range(4)]
        three = [("images", (f"{i}.jpg", jpeg)) for i, jpeg in enumerate(jpegs[:3])]
        assert (await client.post("/embed", files=three)).status_code == 200
        four = [*three, ("images", ("3.jpg", jpegs[3]))]
        refused = await client.post("/items", files=four)
        assert refused.status_code == 413
        detail = refused.json()["detail"]
        assert "DINO_MAX_REQUEST_PIXELS" in detail and str(3 * 96 * 72) in detail
        assert (await client.get("/index")).json()["count"] == 0


@pytest.mark.anyio
async def test_every_503_carries_the_retry_after_setting(tiny_vit_dir, tmp_path):
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file where the data dir should be")
    settings = settings_for(tiny_vit_dir, not_a_dir, retry_after_s=9)
    async with serve_unready(settings) as client:
        for answer in (await client.get("/readyz"), await client.get("/items")):
            assert answer.status_code == 503 and answer.headers["retry-after"] == "9"


@asynccontextmanager
async def serve_unready(settings) -> AsyncIterator[httpx.AsyncClient]:
    """``serve`` without waiting for the index (which cannot open here)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        while app.state.runtime.index_error is None:
            await anyio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield client


def test_request_path_guards_are_not_asserts(tiny_vit_dir, tmp_path):
    """``python -O`` drops asserts: service code checks for real (NotReady is a 503)."""
    found = []
    for path in sorted((ROOT / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assert):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
    rt = Runtime(settings_for(tiny_vit_dir, tmp_path))
    for call in (rt.model_parts, rt.open_index, rt.loaded_manifest):
        with pytest.raises(NotReady, match="not ready"):
            call()
