"""Attacks on the HTTP edge of a live server, each reproduced and shown to fail safely: a foreign
Host (DNS rebinding), cross-site form posts through a user's browser, an unauthenticated upload
that the server would read to the end, made-up methods growing /metrics, a percent-encoded newline
forging an access-log line, and server paths in /index and /models."""

from __future__ import annotations

import json
import shutil
import socket
import time

import httpx
import pytest
from live_server import Server
from service_helpers import metric_value, photo_bytes, serve, settings_for

TOKEN = "s3cret-token"
# Paths a training run recorded on the machine that trained the model.
TRAINED_WITH = {
    "data": "/home/alice/photos",
    "fmnist_dir": "/srv/datasets/fmnist",
    "models_dir": "models",
    "output_dir": "/home/alice/runs/7",
    "arch": "vit_tiny",
    "lr": 0.002,
    "epochs": 3,
    "mean": [0.5, 0.5, 0.5],
}


@pytest.fixture(scope="module")
def model_with_paths(tiny_vit_dir, tmp_path_factory):
    """The tiny ViT, its manifest carrying a training config full of local paths."""
    store = tmp_path_factory.mktemp("store")
    folder = shutil.copytree(tiny_vit_dir, store / "tiny-vit")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["provenance"]["training_config"] = TRAINED_WITH
    manifest["knn"] = {"top1": 0.5, "train_dir": "/home/alice/photos/train"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def live(model_with_paths, tmp_path_factory):
    """A server with the defaults: no token, default allowed hosts."""
    tmp = tmp_path_factory.mktemp("live")
    server = Server(model_with_paths, tmp / "data", tmp / "server.log")
    try:
        server.wait_ready()
        server.data_dir = tmp / "data"
        yield server
    finally:
        server.stop()


def count(server: Server) -> int:
    return httpx.get(f"{server.url}/index").json()["count"]


def post_item(server: Server, item_id: str, **headers: str) -> httpx.Response:
    files = [("images", ("a.jpg", photo_bytes(0)))]
    return httpx.post(
        f"{server.url}/items", files=files, data={"ids": item_id}, headers=headers, timeout=60
    )


def test_a_foreign_host_is_refused_so_dns_rebinding_reads_nothing(live):
    evil = {"Host": "rebind.evil.example"}
    listed = httpx.get(f"{live.url}/items", headers=evil)
    assert listed.status_code == 400, listed.text
    assert "DINO_ALLOWED_HOSTS" in listed.json()["detail"]
    assert post_item(live, "rebound", **evil).status_code == 400
    assert count(live) == 0
    # Probes and scrapers that address the server by IP still get their answers.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{live.url}{path}", headers=evil).status_code == 200
    for host in ("localhost", f"127.0.0.1:{live.port}", "[::1]:8000", "LOCALHOST:1"):
        assert httpx.get(f"{live.url}/items", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},  # sandboxed frames and file:// pages
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site"},  # another local app
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
def test_cross_site_browser_posts_cannot_change_the_index(live, headers):
    added = post_item(live, "forged", **headers)
    assert added.status_code == 403, added.text
    assert "DINO_ALLOWED_ORIGINS" in added.json()["detail"]
    deleted = httpx.delete(f"{live.url}/items/forged", headers=headers)
    assert deleted.status_code == 403
    assert count(live) == 0
    # The web page's own requests (same origin) and non-browser clients keep working.
    own = {"Origin": live.url, "Sec-Fetch-Site": "same-origin"}
    assert post_item(live, "own", **own).status_code == 201
    assert httpx.delete(f"{live.url}/items/own", headers={"Origin": live.url}).status_code == 204
    assert count(live) == 0


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(model_with_paths, tmp_path):
    """20 MB announced, 1 MB sent: the 401 is already there, and the connection is closed, so
    the rest cannot be pushed into the server (it was read and spooled to disk before)."""
    server = Server(
        model_with_paths, tmp_path / "data", tmp_path / "server.log", {"DINO_API_TOKEN": TOKEN}
    )
    try:
        server.wait_ready()
        total = 20 * 2**20
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            head = (
                f"POST /items HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n"
                f"Content-Length: {total}\r\n\r\n--b\r\n"
                'Content-Disposition: form-data; name="images"; filename="a.jpg"\r\n\r\n'
            ).encode()
            sock.sendall(head + b"\0" * 2**20)
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 401"), answer
            assert b"connection: close" in answer.lower()
            sent = len(head) + 2**20
            with pytest.raises(OSError):  # reset or broken pipe: nobody reads the rest
                while sent < total:
                    sent += sock.send(b"\0" * 2**16)
                    time.sleep(0)
            assert sent < total
        authed = {"Authorization": f"Bearer {TOKEN}"}
        assert post_item(server, "ok", **authed).status_code == 201
        assert count(server) == 1
    finally:
        server.stop()


def test_made_up_methods_share_one_metric_label(live):
    before = httpx.get(f"{live.url}/metrics").text
    for i in range(40):
        answer = httpx.request(f"MADEUP{i}", f"{live.url}/items")
        assert answer.status_code == 405
    after = httpx.get(f"{live.url}/metrics").text
    assert "MADEUP" not in after
    assert len(after) - len(before) < 2000, len(after) - len(before)  # was 4.6 KB per method
    other = metric_value(after, "dino_http_requests_total", method="other", status="405")
    assert other >= 40


def test_a_percent_encoded_newline_cannot_forge_a_log_line(live):
    forged = "2030-01-01 00:00:00,000 INFO service.access: DELETE /items/all 204"
    httpx.get(f"{live.url}/x%0A{forged.replace(' ', '%20')}%1b[31m")
    httpx.get(f"{live.url}/healthz")  # the log line above is flushed by now
    lines = live.output().splitlines()
    assert not [line for line in lines if line.startswith("2030-01-01")]
    assert any("/x\\n2030-01-01" in line and "\\x1b[31m" in line for line in lines)


def test_index_and_models_name_no_server_path(live):
    stats = httpx.get(f"{live.url}/index")
    assert stats.status_code == 200 and "data_dir" not in stats.json()
    assert str(live.data_dir) not in stats.text
    models = httpx.get(f"{live.url}/models")
    assert models.status_code == 200
    config = models.json()["provenance"]["training_config"]
    assert config == {"arch": "vit_tiny", "lr": 0.002, "epochs": 3, "mean": [0.5, 0.5, 0.5]}
    assert models.json()["knn"] == {"top1": 0.5}
    assert "/home/alice" not in models.text and "/srv/" not in models.text


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_configured_origins_and_hosts_are_served(tiny_vit_dir, tmp_path):
    settings = settings_for(
        tiny_vit_dir,
        tmp_path,
        allowed_origins=["https://app.example"],
        allowed_hosts=["api.example", "*.internal.example"],
    )
    files = [("images", ("a.jpg", photo_bytes(0)))]
    async with serve(settings) as client:
        client.headers["Host"] = "api.example"
        app = {"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"}
        assert (await client.post("/items", files=files, headers=app)).status_code == 201
        other = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
        assert (await client.post("/items", files=files, headers=other)).status_code == 403
        assert (await client.get("/items", headers={"Host": "a.internal.example"})).is_success
        assert (await client.get("/items", headers={"Host": "localhost"})).status_code == 400
    # DINO_HOST naming one address serves that name too; "*" serves any.
    named = settings_for(tiny_vit_dir, tmp_path / "b", host="box.lan")
    assert "box.lan" in named.host_names() and "localhost" in named.host_names()
    assert settings_for(tiny_vit_dir, tmp_path / "c", host="0.0.0.0").host_names() == (
        "127.0.0.1",
        "localhost",
        "::1",
    )
    async with serve(settings_for(tiny_vit_dir, tmp_path / "d", allowed_hosts=["*"])) as client:
        assert (await client.get("/items", headers={"Host": "any.example"})).is_success
