"""HTTP section: /embed end to end (JPEG upload, decode, preprocess, batched inference, JSON)
against a live ``python -m service`` at several concurrencies, as a ratio of the same engine run
in-process at its best (batch size and, for OpenVINO, streams; measured just before, in the same
run) and of PyTorch eager fp32 (from the engine section); /attention latency; cold start. Each
fixed engine, then the default settings (``auto``: the server measures its candidates and serves
the fastest; the row names what it chose, from GET /models, and compares with that raw engine).

The load generator (``benchmarks.loadgen``'s closed-loop clients, one image per request, requests
encoded once) runs in this process on the same cores as the server, as a client on the same host
would; its CPU per request is reported (``client_cpu_ms``) so the ratio can be read net of it."""

from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

from benchmarks.artifacts import model_dir, spec_for
from benchmarks.common import Mode, percentiles
from benchmarks.httpclient import encode_request, multipart
from benchmarks.loadgen import closed_loop
from benchmarks.photos import jpeg_bytes, real_photos
from benchmarks.server import Server, engine_setting_exists

log = logging.getLogger(__name__)

# (label, server env)
ENGINES = [
    ("onnxruntime-fp32", {"engine": "onnxruntime", "precision": "fp32"}),
    ("openvino-bf16", {"engine": "openvino", "precision": "bf16"}),
]
# The default settings, explicit: a DINO_* variable in the caller's environment must not force it.
AUTO_ENV = {"engine": "auto", "precision": "auto", "model_variant": "auto"}
RAW_BATCHES = (1, 8, 16)  # 8: the server's default DINO_MAX_BATCH; 16 in case it is faster


async def measure_load(
    base: str,
    path: str,
    bodies: list[bytes],
    concurrency: int,
    seconds: float,
    field: str,
    server_cpu: Callable[[], float] | None = None,
) -> dict:
    """Closed-loop clients posting one image each, cycling through ``bodies``; throughput counts
    200 answers only. The client is ``loadgen``'s (requests encoded once, ~0.2 ms of CPU each), and
    its CPU per request is reported, since it runs on the server's cores. With ``server_cpu`` (the
    server process's CPU seconds so far) the server's busy cores in the timed window are too:
    fewer than the machine has means it waited, not that it ran out of CPU."""
    host = urlparse(base).netloc
    requests = [
        encode_request("POST", path, host, *multipart([(field, f"{i}.jpg", body)]))
        for i, body in enumerate(bodies)
    ]
    # Warm-up outside the timed window: first requests pay for lazy imports and shapes.
    await closed_loop(base, concurrency, min(2.0, seconds / 4), lambda i: requests[0])
    t0, server_t0 = time.perf_counter(), server_cpu() if server_cpu else 0.0
    samples, cpu = await closed_loop(
        base, concurrency, seconds, lambda i: requests[i % len(requests)], timeout=120.0
    )
    elapsed = time.perf_counter() - t0
    latencies = [lat for _, status, lat, _ in samples if status == 200]
    out = {
        "req_s": len(latencies) / elapsed,
        "errors": len(samples) - len(latencies),
        "client_cpu_ms": 1000 * cpu / max(1, len(samples)),
        **percentiles(latencies),
    }
    if server_cpu:
        used = server_cpu() - server_t0
        out["server_cores"] = used / elapsed
        out["server_cpu_ms"] = 1000 * used / max(1, len(samples))
    return out


def _parallel_rate(engine, pixels: np.ndarray, callers: int, min_time: float) -> float:
    """Images/s of ``callers`` threads each running ``pixels`` through ``engine`` back to back
    (as the server's batcher does with an engine of ``parallel_calls`` streams)."""
    engine.run(pixels, ("embedding",))  # warm-up: first calls compile shapes
    done = [0] * callers
    stop_at = time.perf_counter() + min_time

    def loop(i: int) -> None:
        while time.perf_counter() < stop_at:
            engine.run(pixels, ("embedding",))
            done[i] += len(pixels)

    started = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - started)


def raw_best(
    env: dict[str, str], folder: Path, threads: int, mode: Mode, batches: tuple[int, ...] = ()
) -> dict:
    """The engine alone, in-process, at its best: every batch size the server may use (or
    ``batches``) and, for OpenVINO, both one stream (all threads on a batch) and the server's
    default streams (batches side by side), median of ``mode.rounds`` interleaved rounds. The
    best of these is what the HTTP figures are divided by, so a setting cannot flatter the ratio."""
    from artifact import load_manifest
    from service.engine_choice import open_engine, openvino_streams

    manifest = load_manifest(folder)
    variant = env.get("model_variant", "fp32")
    precision = "fp32" if env["precision"] == "int8" else env["precision"]  # int8 file: fp32 hint
    streams = [1]
    if env["engine"] == "openvino":
        streams = sorted({1, openvino_streams(0, threads)})
    size = manifest.eval_transform.crop
    rng = np.random.default_rng(0)
    batches = batches or (RAW_BATCHES if not mode.smoke else (1, 2))
    pixels = {b: rng.standard_normal((b, 3, size, size)).astype(np.float32) for b in batches}
    engines = {
        n: open_engine(folder, manifest, variant, threads, env["engine"], precision, n)
        for n in streams
    }
    seen: dict[tuple[int, int], list[float]] = {}
    for _ in range(mode.rounds):
        for n, engine in engines.items():
            callers = getattr(engine, "parallel_calls", 1)
            for b, px in pixels.items():
                rate = _parallel_rate(engine, px, callers, mode.min_time)
                seen.setdefault((n, b), []).append(rate)
    rates = {key: statistics.median(v) for key, v in seen.items()}
    (n, b), best = max(rates.items(), key=lambda kv: kv[1])
    batch1 = [r for (_, bb), r in rates.items() if bb == 1]
    return {
        # A lone client's request is always a batch of one: its fair reference.
        "raw_batch1_img_s": max(batch1) if batch1 else None,
        "raw_best_img_s": best,
        "raw_best_batch": b,
        "raw_best_streams": n,
        "raw_img_s": {f"streams {s} batch {bb}": round(r, 2) for (s, bb), r in rates.items()},
    }


def preprocess_cpu_ms(bodies: list[bytes], folder: Path, rounds: int = 3) -> float:
    """CPU milliseconds the server spends per image outside inference and HTTP: decode and the
    eval transform, with the service's own functions, best of ``rounds`` passes."""
    from artifact import load_manifest
    from service.images import decode_image
    from service.preprocess import eval_pixels

    manifest = load_manifest(folder)
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for body in bodies:
            eval_pixels(decode_image(body, 10**8), manifest)
        best = min(best, time.process_time() - start)
    return 1000 * best / len(bodies)


def cpu_ceiling(raw_img_s: float, threads: int, extra_cpu_ms: float) -> float:
    """The most of the raw engine a server can reach when everything shares ``threads`` cores:
    the engine needs ``threads / raw_img_s`` core-seconds per image at full speed, and each image
    also costs ``extra_cpu_ms`` of CPU on the same cores."""
    engine_ms = 1000 * threads / raw_img_s
    return engine_ms / (engine_ms + extra_cpu_ms)


def _torch_best(so_far: dict, label: str) -> float | None:
    rows = [
        r
        for r in so_far.get("engine", {}).get("speed", [])
        if r["model"] == label and r["path"] == "torch_fp32"
    ]
    return max((r["img_s"] for r in rows), default=None)


def _embed_row(server, bodies, c: int, mode: Mode, raw_img_s: float, torch_best, pre_ms: float,
               threads: int) -> dict:  # fmt: skip
    """One /embed load run at concurrency ``c``, compared with the raw engine and torch."""
    load = measure_load(
        server.url, "/embed", bodies, c, mode.http_seconds, "images", server.cpu_seconds
    )
    r = asyncio.run(load)
    r.update(endpoint="/embed", concurrency=c, img_s=r["req_s"])
    r["x_raw_engine"] = r["img_s"] / raw_img_s
    r["x_torch_fp32"] = r["img_s"] / torch_best if torch_best else None
    # What the shared cores allow once decoding, the eval transform and the load
    # generator take their share (HTTP parsing and JSON not counted: an upper bound).
    extra_ms = pre_ms + r["client_cpu_ms"]
    r["cpu_ceiling"] = cpu_ceiling(raw_img_s, threads, extra_ms)
    log.info("/embed c=%d: %.1f img/s (%.2f of raw)", c, r["img_s"], r["x_raw_engine"])
    return r


def add_batch1_ratio(rows: list[dict], raw: dict) -> list[dict]:
    """``x_raw_batch1`` on the c=1 /embed row: against the raw engine at batch 1 (a lone
    client's request can only ever be a batch of one)."""
    for row in rows:
        if row["endpoint"] == "/embed" and row["concurrency"] == 1 and raw["raw_batch1_img_s"]:
            row["x_raw_batch1"] = row["img_s"] / raw["raw_batch1_img_s"]
    return rows


def _check_engine(server: Server, engine: str, label: str) -> None:
    """Settings ignore unknown variables: prove the server runs the engine we label."""
    ov_loaded = "with OpenVINO" in server.log_path.read_text(errors="replace")
    if ov_loaded != (engine == "openvino"):
        raise RuntimeError(f"server engine is not {label}; see {server.log_path}")


def _load_rows(server: Server, bodies, mode: Mode, raw_img_s: float, torch_best, pre_ms: float,
               threads: int) -> list[dict]:  # fmt: skip
    """/embed at each concurrency, then /attention at 1."""
    rows = [
        _embed_row(server, bodies, c, mode, raw_img_s, torch_best, pre_ms, threads)
        for c in mode.concurrency
    ]
    half = mode.http_seconds / 2
    att = asyncio.run(measure_load(server.url, "/attention", bodies[:1], 1, half, "image"))
    rows.append({**att, "endpoint": "/attention", "concurrency": 1, "img_s": att["req_s"]})
    return rows


def _server_result(label: str, env: dict, spec, folder: Path, bodies, threads: int, mode: Mode,
                   torch_best, pre_ms: float) -> dict:  # fmt: skip
    """Start a server on one engine and measure /embed at each concurrency, then /attention."""
    raw = raw_best(env, folder, threads, mode)
    with (
        tempfile.TemporaryDirectory(prefix="bench-http-") as tmp,
        Server(folder.parent, folder.name, Path(tmp) / "data", threads, **env) as server,
    ):
        log.info("server %s ready in %.2f s", label, server.cold_start_s)
        _check_engine(server, env["engine"], label)
        rows = _load_rows(server, bodies, mode, raw["raw_best_img_s"], torch_best, pre_ms, threads)
        add_batch1_ratio(rows, raw)
        return {
            "engine": label,
            "model": spec.label,
            "cold_start_s": server.cold_start_s,
            **raw,
            "torch_fp32_best_img_s": torch_best,
            "load": rows,
        }


def _engine_choice(server: Server) -> dict:
    resp = httpx.get(f"{server.url}/models", timeout=30.0)
    resp.raise_for_status()
    return resp.json()["engine_choice"]


def _auto_result(spec, folder: Path, bodies, threads: int, mode: Mode, torch_best,
                 pre_ms: float) -> dict:  # fmt: skip
    """Default settings: a first start measures the candidates (GET /models says which won and
    their img/s); the engine it chose is then measured raw, in-process, with the server stopped;
    a restart on the same data folder (choice and OpenVINO's compiled models cached) takes the
    load, compared with that raw engine."""
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        data = Path(tmp) / "data"
        with Server(folder.parent, folder.name, data, threads, **AUTO_ENV) as server:
            first_start_s, choice = server.cold_start_s, _engine_choice(server)
        if choice["how"] != "measured":
            raise RuntimeError(f"the default settings did not measure the engines: {choice}")
        log.info("server auto: chose %s %s (%s) in %.2f s", choice["engine"],
                 choice["precision"], choice["variant"], first_start_s)  # fmt: skip
        env = {k: choice[k] for k in ("engine", "precision")}
        raw = raw_best({**env, "model_variant": choice["variant"]}, folder, threads, mode)
        with Server(folder.parent, folder.name, data, threads, **AUTO_ENV) as server:
            again = _engine_choice(server)
            if again["how"] != "cached" or again["variant"] != choice["variant"]:
                raise RuntimeError(f"the restart did not reuse the cached choice: {again}")
            _check_engine(server, choice["engine"], f"auto ({choice['engine']})")
            rows = _load_rows(
                server, bodies, mode, raw["raw_best_img_s"], torch_best, pre_ms, threads
            )
            add_batch1_ratio(rows, raw)
            restart_s = server.cold_start_s
    return {
        "engine": "auto",
        "model": spec.label,
        "chose": {k: choice[k] for k in ("engine", "precision", "variant")},
        "candidates_img_s": choice["images_per_s"],
        "refused_variants": choice["refused_variants"],
        "measured_s": choice["measured_s"],
        "cold_start_s": first_start_s,
        "restart_s": restart_s,
        **raw,
        "torch_fp32_best_img_s": torch_best,
        "load": rows,
    }


def run(mode: Mode, threads: int, so_far: dict) -> dict:
    spec = spec_for("vit_small", mode.smoke)
    folder = model_dir(spec, mode.cache)
    images, _ = real_photos()
    bodies = jpeg_bytes(images)
    torch_best = _torch_best(so_far, spec.label)
    pre_ms = preprocess_cpu_ms(bodies, folder)
    log.info("decode + eval transform: %.2f CPU ms per image", pre_ms)
    out: dict = {"model": spec.label, "preprocess_cpu_ms": pre_ms, "servers": []}
    engines = ENGINES if engine_setting_exists() else ENGINES[:1]
    if len(engines) < len(ENGINES):
        log.warning("this server has no DINO_ENGINE setting: only onnxruntime is measured")
    for label, env in engines:
        out["servers"].append(
            _server_result(label, env, spec, folder, bodies, threads, mode, torch_best, pre_ms)
        )
    if len(engines) == len(ENGINES):  # a server that chooses its engine by measurement
        out["servers"].append(_auto_result(spec, folder, bodies, threads, mode, torch_best, pre_ms))
    return out
