"""Peak memory (RSS) of a live server per request shape: what one request can make it hold.

``python -m benchmarks.memory_bench`` (or ``python -m benchmarks --only memory``) starts
``python -m service`` with the default limits, sends each shape, and reads the server's peak RSS
(``VmHWM``, reset between shapes through ``/proc/<pid>/clear_refs``). The images are synthetic and
compress to almost nothing (a 6000 x 6000 16-bit PNG is ~100 KB): decoded size, not upload size,
is what costs memory. Writes ``benchmarks/results/<date>-<cpu>-memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from artifact.cli import UsageError, run_cli
from benchmarks.artifacts import model_dir, spec_for
from benchmarks.common import MODES, Mode, machine
from benchmarks.report import table
from benchmarks.server import Server

log = logging.getLogger("benchmarks")
RESULTS = Path(__file__).resolve().parent / "results"
MB = 1024 * 1024


def grey16_png(side: int) -> bytes:
    """A ``side`` x ``side`` 16-bit grey PNG (a smooth ramp: tiny file, full decoded size)."""
    ramp = np.linspace(0, 65535, side, dtype=np.float64).astype(np.uint16)
    img = Image.fromarray(np.broadcast_to(ramp, (side, side)).copy())
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False, compress_level=9)
    return out.getvalue()


def rgba_png(side: int) -> bytes:
    arr = np.zeros((side, side, 4), np.uint8)
    arr[..., 1] = np.linspace(0, 255, side, dtype=np.uint8)
    arr[..., 3] = 128
    out = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(out, format="PNG", compress_level=9)
    return out.getvalue()


def small_jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=90)
    return out.getvalue()


# --smoke: one decoded huge image, one refused request, the small-JPEG batch (seconds, not minutes)
SMOKE_SHAPES = ("one_huge_png", "64_huge_png", "64_small_jpegs")
MAX_SIDE = 6324  # 6324^2 = 39,992,976 <= DINO_MAX_IMAGE_PIXELS (40,000,000)
# name -> (description, files per request, concurrent requests, body maker)
SHAPES: dict[str, tuple[str, int, int, Callable[[], bytes]]] = {
    "one_huge_png": ("one 6000 x 6000 16-bit grey PNG", 1, 1, lambda: grey16_png(6000)),
    "64_huge_png": ("64 x 6000 x 6000 16-bit PNGs in one request", 64, 1, lambda: grey16_png(6000)),
    "64_small_jpegs": ("64 x 640 x 480 JPEGs in one request", 64, 1, lambda: small_jpeg(0)),
    "max_rgba_png": (
        f"one {MAX_SIDE} x {MAX_SIDE} RGBA PNG (40 MP: the per-image limit)",
        1,
        1,
        lambda: rgba_png(MAX_SIDE),
    ),
    "max_request_4x": (
        "4 concurrent requests of 6 x 40 MP 16-bit PNGs (the per-request pixel limit)",
        6,
        4,
        lambda: grey16_png(MAX_SIDE),
    ),
}


def _rss(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields


def _reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


async def _send(url: str, body: bytes, files: int, concurrent: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one() -> int:
            parts = [("images", (f"{i}.img", body)) for i in range(files)]
            return (await client.post("/embed", files=parts)).status_code

        return list(await asyncio.gather(*(one() for _ in range(concurrent))))


def measure(server: Server, name: str) -> dict:
    description, files, concurrent, _ = SHAPES[name]
    body = SHAPES[name][3]()
    time.sleep(0.5)
    exact = _reset_peak(server.proc.pid)
    before = _rss(server.proc.pid)
    started = time.perf_counter()
    statuses = asyncio.run(_send(server.url, body, files, concurrent))
    seconds = time.perf_counter() - started
    after = _rss(server.proc.pid)
    row = {
        "shape": name,
        "description": description,
        "upload_mb": round(len(body) * files * concurrent / MB, 2),
        "decoded_mpx": round(_pixels(body) * files * concurrent / 1e6, 1),
        "statuses": ",".join(str(s) for s in sorted(set(statuses))),
        "rss_before_mb": round(before["VmRSS"], 1),
        "peak_rss_mb": round(after["VmHWM"], 1),
        "peak_growth_mb": round(after["VmHWM"] - before["VmRSS"], 1),
        "seconds": round(seconds, 2),
        "peak_exact": exact,  # False: VmHWM is the process's peak since start
    }
    log.info("%s: %s -> peak %.0f MB (+%.0f)", name, row["statuses"], *_peaks(row))
    return row


def _pixels(body: bytes) -> int:
    with Image.open(io.BytesIO(body)) as img:
        return img.width * img.height


def _peaks(row: dict) -> tuple[float, float]:
    return row["peak_rss_mb"], row["peak_growth_mb"]


def run(mode: Mode, threads: int, so_far: dict, shapes: list[str] | None = None) -> dict:
    """The memory section: every shape against one server with the default limits."""
    spec = spec_for("vit_tiny", smoke=True)  # memory per request does not depend on the model
    folder = model_dir(spec, mode.cache)
    names = shapes or (list(SMOKE_SHAPES) if mode.smoke else list(SHAPES))
    with (
        tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp,
        Server(folder.parent, folder.name, Path(tmp) / "data", threads) as server,
    ):
        idle = _rss(server.proc.pid)["VmRSS"]
        rows = [measure(server, name) for name in names]
    from service.settings import Settings

    defaults = Settings(_env_file=None)
    limits = {
        k: getattr(defaults, k, None)
        for k in (
            "max_image_pixels",
            "max_request_pixels",
            "max_decode_pixels",
            "max_images_per_request",
            "max_upload_bytes",
            "max_request_bytes",
        )
    }
    return {
        "model": spec.label,
        "threads": threads,
        "idle_rss_mb": round(idle, 1),
        "worst_peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
        "limits": limits,
        "rows": rows,
    }


def markdown(section: dict) -> list[str]:
    lines = ["## Memory per request shape", ""]
    lines.append(
        "Peak RSS of the server process (VmHWM, reset before each shape); limits: "
        + ", ".join(f"{k} {v:,}" for k, v in section["limits"].items() if v is not None)
    )
    if "idle_rss_mb" in section:
        lines.append(
            f"Model {section['model']}, {section['threads']} threads; RSS when ready "
            f"{section['idle_rss_mb']:.0f} MB; worst peak {section['worst_peak_rss_mb']:.0f} MB "
            "(shapes run in order on one server: rss_before includes memory the allocator kept)."
        )
    lines.append("")
    cols = ["shape", "description", "statuses", "upload_mb", "decoded_mpx"]
    lines += table(section["rows"], [*cols, "rss_before_mb", "peak_rss_mb", "peak_growth_mb"])
    return lines


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_bench", description=__doc__)
    p.add_argument(
        "--shapes", default=",".join(SHAPES), help=f"comma list of shapes from {list(SHAPES)}"
    )
    p.add_argument("--threads", type=int, default=2, help="DINO_THREADS of the server")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise UsageError(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(
            ["python -m benchmarks.memory_bench", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "memory": run(MODES["default"], args.threads, {}, shapes),
    }
    from benchmarks.report import result_stem

    stem = args.out / result_stem({**result, "mode": "default", "sections": ["memory"]})
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    head = [f"# Memory per request: {m['cpu']}, {result['date']}", "", f"`{result['command']}`", ""]
    stem.with_suffix(".md").write_text("\n".join(head + markdown(result["memory"])) + "\n")
    log.info("wrote %s.json and .md", stem)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m benchmarks.memory_bench"))
