"""HTTP section: /embed end to end (JPEG upload, decode, preprocess, batched inference, JSON)
against a live ``python -m service`` at several concurrencies, as a ratio of the same engine run
in-process at its best batch size (measured just before, in the same run) and of PyTorch eager
fp32 (from the engine section); /attention latency; cold start. The load generator (httpx, one
image per request) shares the CPU with the server, as a client on the same host would."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.artifacts import model_dir, spec_for
from benchmarks.common import Mode, interleaved, percentiles
from benchmarks.photos import jpeg_bytes, real_photos
from benchmarks.server import Server, engine_setting_exists

log = logging.getLogger(__name__)

# (label, server env, in-process engine path for the raw ratio)
ENGINES = [
    ("onnxruntime-fp32", {"engine": "onnxruntime", "precision": "fp32"}, "ort_fp32"),
    ("openvino-bf16", {"engine": "openvino", "precision": "bf16"}, "ov_bf16"),
]
RAW_BATCHES = (1, 8, 16)  # 16: the server's default DINO_MAX_BATCH


async def _load(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, field: str = "images"
) -> dict:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:
        stop_at = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal errors
            n = i
            while time.perf_counter() < stop_at:
                files = {field: (f"{n}.jpg", bodies[n % len(bodies)], "image/jpeg")}
                t0 = time.perf_counter()
                resp = await client.post(url, files=files)
                if resp.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                n += concurrency

        # Warm-up outside the timed window: first requests pay for lazy imports and shapes.
        await asyncio.gather(
            *(
                client.post(url, files={field: ("w.jpg", bodies[0], "image/jpeg")})
                for _ in range(concurrency)
            )
        )
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"req_s": len(latencies) / elapsed, "errors": errors, **percentiles(latencies)}


def _raw_best(path: str, spec, folder: Path, threads: int, mode: Mode) -> tuple[float, int]:
    from benchmarks.paths import make_path

    fn = make_path(path, spec, folder, threads)
    rng = np.random.default_rng(0)
    calls, sizes = {}, {}
    for b in RAW_BATCHES if not mode.smoke else (1, 2):
        px = rng.standard_normal((b, 3, spec.image_size, spec.image_size), np.float32)
        calls[f"b{b}"] = lambda px=px: fn(px)
        sizes[f"b{b}"] = b
    # interleaved() counts calls x items; run per batch size so items match.
    best = max(
        ((interleaved({k: c}, sizes[k], mode.min_time, 1)[k], sizes[k]) for k, c in calls.items())
    )
    return best


def _torch_best(so_far: dict, label: str) -> float | None:
    rows = [
        r
        for r in so_far.get("engine", {}).get("speed", [])
        if r["model"] == label and r["path"] == "torch_fp32"
    ]
    return max((r["img_s"] for r in rows), default=None)


def run(mode: Mode, threads: int, so_far: dict) -> dict:
    spec = spec_for("vit_small", mode.smoke)
    folder = model_dir(spec, mode.cache)
    images, _ = real_photos()
    bodies = jpeg_bytes(images)
    torch_best = _torch_best(so_far, spec.label)
    out: dict = {"model": spec.label, "servers": []}
    engines = ENGINES if engine_setting_exists() else ENGINES[:1]
    if len(engines) < len(ENGINES):
        log.warning("this server has no DINO_ENGINE setting: only onnxruntime is measured")
    for label, env, path in engines:
        raw_img_s, raw_batch = _raw_best(path, spec, folder, threads, mode)
        with (
            tempfile.TemporaryDirectory(prefix="bench-http-") as tmp,
            Server(folder.parent, folder.name, Path(tmp) / "data", threads, **env) as server,
        ):
            log.info("server %s ready in %.2f s", label, server.cold_start_s)
            # Settings ignore unknown variables: prove the server runs the engine we label.
            ov_loaded = "with OpenVINO" in server.log_path.read_text(errors="replace")
            if ov_loaded != (env["engine"] == "openvino"):
                raise RuntimeError(f"server engine is not {label}; see {server.log_path}")
            rows = []
            for c in mode.concurrency:
                r = asyncio.run(_load(f"{server.url}/embed", bodies, c, mode.http_seconds))
                r.update(endpoint="/embed", concurrency=c, img_s=r["req_s"])
                r["x_raw_engine"] = r["img_s"] / raw_img_s
                r["x_torch_fp32"] = r["img_s"] / torch_best if torch_best else None
                log.info("/embed c=%d: %.1f img/s (%.2f of raw)", c, r["img_s"], r["x_raw_engine"])
                rows.append(r)
            att = asyncio.run(
                _load(f"{server.url}/attention", [bodies[0]], 1, mode.http_seconds / 2, "image")
            )
            rows.append({**att, "endpoint": "/attention", "concurrency": 1, "img_s": att["req_s"]})
            out["servers"].append(
                {
                    "engine": label,
                    "model": spec.label,
                    "cold_start_s": server.cold_start_s,
                    "raw_best_img_s": raw_img_s,
                    "raw_best_batch": raw_batch,
                    "torch_fp32_best_img_s": torch_best,
                    "load": rows,
                }
            )
    return out
