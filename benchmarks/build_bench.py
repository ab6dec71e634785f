"""Build section: ``python -m service.index build`` over a folder of JPEG photos, as a ratio of the
raw engine it runs on (the promise: at least 0.85 of it, decoding and resizing overlapped with
inference).

Photos: the suite's real photos (``benchmarks.photos``) resized so the long side is 640 px, as
uploads from a phone or a web page typically are (the smaller ones upscaled), mirrored on every
second pass through the set to reach N distinct files, JPEG quality 90.

The build runs as a user runs it: the real CLI in a child process, default engine settings
(``auto``). A first build of two photos into a scratch data folder measures the engine candidates
and caches the choice; each timed build goes into a fresh data folder holding only that cached
choice (and OpenVINO's compiled models), so the one-off measurement is never timed. Its own
images/s (embedding and storing, from its summary line) and its wall time (process start to exit)
are both kept. The engine it chose is then run in-process on pixels made once (no decoding), at
the build's batch size and two others, best kept; build and raw runs alternate over the rounds and
the medians are compared, so load from other processes hits both alike."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.artifacts import model_dir, spec_for
from benchmarks.common import Mode, machine
from benchmarks.http_bench import raw_best
from benchmarks.photos import jpeg_bytes, real_photos

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
LONG_SIDE = 640  # px, the photos' long side
TARGET = 0.85  # the promised share of the raw engine
# The build's last line: "N images found: A added, S already indexed, F failed; R images/s; ..."
SUMMARY = re.compile(r"(\d+) added, .*?; ([0-9.]+) images/s")


def build_batch() -> int:
    """The build's default ``--batch-size``, read from its own parser."""
    from service.index.__main__ import parse_args

    return parse_args(["build", "--images", "."]).batch_size


def write_photos(folder: Path, n: int, long_side: int = LONG_SIDE) -> int:
    """``n`` JPEG files in ``folder`` (see the module docstring); returns their total bytes."""
    from PIL import Image, ImageOps

    images, _ = real_photos()
    sized = []
    for img in images:
        scale = long_side / max(img.size)
        size = (round(img.width * scale), round(img.height * scale))
        sized.append(img.resize(size, Image.Resampling.LANCZOS))
    passes = [jpeg_bytes(sized), jpeg_bytes([ImageOps.mirror(img) for img in sized])]
    folder.mkdir(parents=True)
    total = 0
    for i in range(n):
        body = passes[(i // len(sized)) % 2][i % len(sized)]
        (folder / f"photo-{i:05d}.jpg").write_bytes(body)
        total += len(body)
    return total


def _env(threads: int) -> dict[str, str]:
    """The caller's environment without its ``DINO_*`` settings (one could force an engine), and
    the suite's thread count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINO_")}
    return {**env, "DINO_THREADS": str(threads)}


def run_build(folder: Path, images: Path, data: Path, threads: int) -> dict:
    """One ``python -m service.index build`` in a child process: the images it added, the
    images/s it reported, its wall time and the engine choice record it used."""
    from service.engine_measure import CACHE_NAME

    cmd = [sys.executable, "-m", "service.index", "build", "--images", str(images)]
    cmd += ["--models-dir", str(folder.parent), "--model", folder.name]
    cmd += ["--data-dir", str(data), "--no-progress"]
    started, t0 = time.time(), time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"the build exited {done.returncode}: {done.stderr[-3000:]}")
    found = SUMMARY.search(done.stdout)
    if found is None:
        raise RuntimeError(f"no images/s in the build's output: {done.stdout[-1000:]}")
    record = json.loads((data / CACHE_NAME).read_text())
    return {
        "added": int(found[1]),
        "img_s": float(found[2]),
        "wall_s": wall,
        "record": record,
        "cached": record["measured_at"] < started,  # written by an earlier build, not this one
    }


def _fresh_data(warm: Path, data: Path) -> None:
    """An empty index folder holding only the warm-up build's engine choice and compiled models:
    what a second build on the same machine finds."""
    from service.engine_choice import OPENVINO_CACHE
    from service.engine_measure import CACHE_NAME

    data.mkdir(parents=True)
    shutil.copy2(warm / CACHE_NAME, data / CACHE_NAME)
    if (warm / OPENVINO_CACHE).is_dir():
        shutil.copytree(warm / OPENVINO_CACHE, data / OPENVINO_CACHE)


def _round(number: int, folder: Path, photos: Path, tmp: Path, warm: dict, threads: int,
           mode: Mode, batches: tuple[int, ...]) -> dict:  # fmt: skip
    """One timed build into a fresh index, then the same engine raw."""
    data = tmp / f"data-{number}"
    _fresh_data(tmp / "warm-data", data)
    n = len(list(photos.iterdir()))
    built = run_build(folder, photos, data, threads)
    if not built["cached"] or built["record"]["choice"] != warm["record"]["choice"]:
        raise RuntimeError(f"the timed build did not reuse the cached engine choice: {built}")
    if built["added"] != n:
        raise RuntimeError(f"the build added {built['added']} of {n} photos")
    shutil.rmtree(data)
    c = warm["record"]["choice"]
    env = {"engine": c["engine"], "precision": c["precision"], "model_variant": c["variant"]}
    raw = raw_best(env, folder, threads, dataclasses.replace(mode, rounds=1), batches)
    row = {
        "round": number,
        "build_img_s": built["img_s"],
        "end_to_end_img_s": n / built["wall_s"],
        "wall_s": built["wall_s"],
        **raw,
        "x_raw_engine": built["img_s"] / raw["raw_best_img_s"],
        "load_avg": os.getloadavg()[0],
    }
    log.info("build round %d: %.2f img/s (%.2f end to end), raw %.2f img/s: %.3f of raw", number,
             row["build_img_s"], row["end_to_end_img_s"], row["raw_best_img_s"],
             row["x_raw_engine"])  # fmt: skip
    return row


def _summary(rows: list[dict], batch: int) -> dict:
    """Medians over the rounds: the build's, and each raw configuration's (batch, streams) with
    the best of those kept, as the HTTP section does (the best of single noisy windows would
    flatter the raw engine). Also the raw engine at the build's batch, one call at a time with
    every thread on it: the build makes one call at a time, so this separates what it loses to
    decoding and storing from what it leaves unused (OpenVINO's streams side by side)."""
    med = {k: statistics.median(r[k] for r in rows) for k in ("build_img_s", "end_to_end_img_s")}
    raw = {
        k: round(statistics.median(r["raw_img_s"][k] for r in rows), 2)
        for k in rows[0]["raw_img_s"]
    }
    best = max(raw, key=raw.__getitem__)
    _, streams, _, batch = best.split()  # "streams 2 batch 32"
    med.update(raw_best_img_s=raw[best], raw_best_batch=int(batch), raw_best_streams=int(streams))
    med["raw_img_s"] = raw
    med["x_raw_engine"] = med["build_img_s"] / med["raw_best_img_s"]
    med["x_raw_end_to_end"] = med["end_to_end_img_s"] / med["raw_best_img_s"]
    med["raw_one_call_img_s"] = raw[f"streams 1 batch {batch}"]
    med["x_raw_one_call"] = med["build_img_s"] / med["raw_one_call_img_s"]
    return med


def run(mode: Mode, threads: int, so_far: dict) -> dict:
    spec = spec_for("vit_small", mode.smoke)
    folder = model_dir(spec, mode.cache)
    n = 16 if mode.smoke else 128
    rounds = 1 if mode.smoke else max(2, mode.rounds)
    batch = build_batch()
    batches = tuple(sorted({8, 16, batch}))
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-build-") as name:
        tmp = Path(name)
        jpeg_total = write_photos(tmp / "photos", n)
        write_photos(tmp / "warm-photos", 2)
        warm = run_build(folder, tmp / "warm-photos", tmp / "warm-data", threads)
        chose = warm["record"]["choice"]
        log.info("build: default settings chose %s; timing %d rounds of %d photos", chose, rounds,
                 n)  # fmt: skip
        rows = [
            _round(r, folder, tmp / "photos", tmp, warm, threads, mode, batches)
            for r in range(1, rounds + 1)
        ]
    return {
        "model": spec.label,
        "images": n,
        "long_side_px": LONG_SIDE,
        "jpeg_kb_mean": jpeg_total / n / 1024,
        "batch_size": batch,
        "raw_batches": list(batches),
        "chose": chose,
        "candidates_img_s": warm["record"]["timings"],
        "choice_measured_s": warm["record"]["measured_s"],
        "cpu_family": (so_far.get("machine") or machine())["cpu_family"],
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg()[0],
        "target": TARGET,
        **_summary(rows, batch),
        "rounds": rows,
    }
