"""Bulk embedding on a real local Ray cluster into a real PostgreSQL index: killed half way with
``kill -9``, run again, every image indexed exactly once; every Ray process on loopback only."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_helpers import photo_bytes

from artifact import load_manifest
from service.engine_choice import open_engine
from service.index.build import embed_files

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 20
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def build_command(images: Path) -> list[str]:
    return [
        sys.executable, "-m", "service.index", "build", "--images", str(images), "--ray",
        "--workers", "1", "--shard-size", "2", "--batch-size", "2", "--no-progress",
    ]  # fmt: skip


def non_loopback_sockets(pids: list[int]) -> list[str]:
    import psutil

    bad = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            ends = [c.laddr] + ([c.raddr] if c.raddr else [])
            bad += [f"{pid}: {c.laddr} -> {c.raddr}" for e in ends if e.ip not in LOOPBACK]
    return bad


def indexed(url: str) -> list[tuple[str, str]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT id, source FROM dino_items ORDER BY id").fetchall()


def test_ray_build_killed_half_way_resumes_exactly_once(tiny_vit_dir, tmp_path, pg_url):
    pytest.importorskip("ray", reason="needs the ray extra")
    import psutil

    images = tmp_path / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        (images / f"img{i:02d}.jpg").write_bytes(photo_bytes(i))
    for i in range(4, N_IMAGES):  # 9 Mpixel: slow enough to decode that a kill lands mid-build
        Image.new("RGB", (3000, 3000), (i * 8, 100, 200)).save(
            images / f"img{i:02d}.jpg", format="PNG", compress_level=1
        )
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are long
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DINO_")},
        "DINO_MODELS_DIR": str(tiny_vit_dir.parent),
        "DINO_MODEL": tiny_vit_dir.name,
        "DINO_INDEX_URL": pg_url,
        "DINO_ENGINE": "onnxruntime",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_TMPDIR": ray_tmp,
    }
    first = subprocess.Popen(
        build_command(images), cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    family: list[psutil.Process] = []
    try:
        written, lines = 0, []
        deadline = time.monotonic() + 180
        while written < 2:
            assert time.monotonic() < deadline, "".join(lines)
            line = first.stdout.readline()
            assert line or first.poll() is None, "".join(lines)
            lines.append(line)
            written += bool(re.search(r"shard \d+ written", line))
        family = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
        assert len(family) > 2, "no Ray processes started"
        assert non_loopback_sockets([p.pid for p in family]) == []
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and its session, mid-build
        first.wait(30)
        for proc in family:  # any Ray daemon that left the session
            if proc.is_running():
                proc.kill()
    half = indexed(pg_url)
    assert 0 < len(half) < N_IMAGES and len(half) % 2 == 0  # whole shards only

    again = subprocess.run(
        build_command(images), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{len(half) // 2} shards already written" in again.stderr
    assert f"{N_IMAGES - len(half)} added, {len(half)} already indexed" in again.stdout
    done = indexed(pg_url)
    assert [i for i, _ in done] == [f"img{i:02d}.jpg" for i in range(N_IMAGES)]
    assert len({s for _, s in done}) == N_IMAGES

    # The vectors are the server's: the same preprocessing and engine, run here directly.
    manifest = load_manifest(tiny_vit_dir)
    engine = open_engine(tiny_vit_dir, manifest, "fp32", 1, "onnxruntime", "auto")
    _, direct, _, _ = embed_files([images / "img05.jpg"], manifest, engine, 10**8, 128)
    import psycopg
    from pgvector.psycopg import register_vector

    with psycopg.connect(pg_url) as conn:
        register_vector(conn)
        sql = "SELECT embedding FROM dino_items WHERE id = 'img05.jpg'"
        (stored,) = conn.execute(sql).fetchone()
    np.testing.assert_allclose(np.asarray(stored.to_numpy()), direct[0], atol=1e-5)
