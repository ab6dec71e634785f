"""Fuzz the served OpenAPI schema with schemathesis against a live uvicorn server: no 5xx, every
status and body as documented. Plus regression tests for what the fuzzer found."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from live_server import Server
from reliability import record
from service_helpers import photo_bytes, serve, settings_for

ST = Path(sys.executable).with_name("st")  # schemathesis' CLI, installed beside this python
# Bounded so the run takes well under a minute on 2 shared cores.
MAX_EXAMPLES = int(os.environ.get("DINO_FUZZ_EXAMPLES", "40"))


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors_or_schema_violations(tiny_vit_dir, tmp_path):
    if not ST.exists():
        pytest.fail("schemathesis is not installed: pip install -e '.[dev]'")
    server = Server(
        tiny_vit_dir, tmp_path / "data", tmp_path / "server.log", {"DINO_API_TOKEN": "t"}
    )
    try:
        server.wait_ready()
        # A few real items, so GET /similar, /items/{id} and DELETE can reach past 404.
        added = httpx.post(
            f"{server.url}/items",
            files=[("images", (f"{i}.jpg", photo_bytes(i))) for i in range(3)],
            data={"ids": ["0", "1", "2"]},
            headers={"Authorization": "Bearer t"},
            timeout=30,
        )
        assert added.status_code == 201, added.text
        run = subprocess.run(
            [
                str(ST),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "all",
                # Binary fields are "any bytes" in the schema; non-images get the documented
                # 400/415, which this check would flag. ignored_auth needs a security scheme.
                "--exclude-checks",
                "positive_data_acceptance,ignored_auth",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--workers",
                "1",
                "--request-timeout",
                "30",
                "--header",
                "Authorization: Bearer t",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        log = server.output()
    finally:
        server.stop()
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    assert " 500 " not in log and "Traceback" not in log, log[-4000:]
    generated = [line.strip() for line in report.splitlines() if " generated" in line]
    record(
        "openapi_fuzz",
        {"max_examples": MAX_EXAMPLES, "result": generated[-1] if generated else None},
    )


async_test = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@async_test
async def test_huge_offset_is_422_not_500(tiny_vit_dir, tmp_path):
    # Found by schemathesis: OFFSET past SQLite's 64-bit integers raised OverflowError (500).
    async with serve(settings_for(tiny_vit_dir, tmp_path)) as client:
        huge = await client.get("/items", params={"offset": str(2**65)})
        fine = await client.get("/items", params={"offset": str(2**62)})
    assert huge.status_code == 422 and "offset" in huge.json()["detail"]
    assert fine.status_code == 200 and fine.json()["items"] == []


@async_test
@pytest.mark.parametrize(
    ("path", "allowed"),
    [("/items", "GET, POST"), ("/items/x", "DELETE, GET"), ("/similar", "GET, POST")],
)
async def test_405_lists_every_method_of_the_path(tiny_vit_dir, tmp_path, path, allowed):
    # Found by schemathesis: Starlette named only the first route's methods (Allow: POST on
    # /items), so a client could not learn that GET /items exists.
    async with serve(settings_for(tiny_vit_dir, tmp_path)) as client:
        response = await client.put(path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json() == {"detail": "Method Not Allowed"}
