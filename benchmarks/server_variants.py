"""A/B of server variants that need no code change in ``service/``: /embed img/s at c=1 and c=32,
OpenVINO bf16 ViT-S/16, each variant a fresh ``python -m service``, rounds interleaved.

    python -m benchmarks.server_variants [--seconds 15] [--rounds 2] [--smoke]

Variants: ``default``; ``h11`` (uvicorn without httptools/uvloop, blocked at import: compares
the pure-Python HTTP stack with uvicorn's fast one when those are installed); ``unpinned``
(OpenVINO ``ENABLE_CPU_PINNING=False`` injected into every compile). Writes
``benchmarks/results/server_variants.json`` (``--out``). The model is the suite's random-weight
ViT-S/16, exported into its cache on first use."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from artifact.cli import run_cli
from benchmarks.artifacts import model_dir, spec_for
from benchmarks.common import MODES
from benchmarks.http_bench import measure_load
from benchmarks.photos import jpeg_bytes, real_photos
from benchmarks.server import Server

# Code run in the server process before ``python -m service``'s main.
PRELUDES = {
    "default": "",
    "h11": "import sys\nsys.modules['httptools'] = None\nsys.modules['uvloop'] = None\n",
    "unpinned": (
        "import openvino as ov\n"
        "_compile = ov.Core.compile_model\n"
        "def compile_unpinned(self, model, device=None, config=None):\n"
        "    config = {**(config or {}), 'ENABLE_CPU_PINNING': False}\n"
        "    return _compile(self, model, device, config)\n"
        "ov.Core.compile_model = compile_unpinned\n"
    ),
}
RESULTS = Path(__file__).resolve().parent / "results"
LAUNCH = "import runpy\nrunpy.run_module('service', run_name='__main__')\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.server_variants", description=__doc__)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default=",".join(PRELUDES))
    p.add_argument("--smoke", action="store_true", help="the tests' tiny ViT: proves it runs")
    p.add_argument("--out", type=Path, default=RESULTS / "server_variants.json")
    args = p.parse_args(argv)
    folder = model_dir(spec_for("vit_small", args.smoke), MODES["default"].cache)
    bodies = jpeg_bytes(real_photos()[0])
    threads = len(os.sched_getaffinity(0))
    rates: dict[str, list[float]] = {}
    env = {"engine": "openvino", "precision": "bf16"}
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
        for round_ in range(args.rounds):
            for variant in args.variants.split(","):
                data = Path(tmp) / f"{variant}-{round_}" / "data"
                command = [sys.executable, "-c", PRELUDES[variant] + LAUNCH]
                with Server(folder.parent, folder.name, data, threads, command, **env) as server:
                    for c in (1, 32):
                        load = measure_load(server.url, "/embed", bodies, c, args.seconds, "images")
                        img_s = asyncio.run(load)["req_s"]
                        rates.setdefault(f"{variant} c={c}", []).append(round(img_s, 1))
                        print(f"round {round_} {variant} c={c}: {img_s:.1f} img/s", flush=True)
    out = {"model": str(folder), "seconds": args.seconds, "img_s": rates}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m benchmarks.server_variants"))
