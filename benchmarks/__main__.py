"""``python -m benchmarks [--quick | --smoke | --full] [--only SECTION,...]``.

Sections: engine, http, build, search, train, memory (all by default).

Writes ``benchmarks/results/<date>-<cpu>.json`` and ``.md`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from artifact.cli import RunFailed, UsageError, run_cli
from benchmarks.common import MODES, SECTIONS, machine
from benchmarks.report import result_stem, write_markdown

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("benchmarks")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes: proves it runs (<1 min)")
    size.add_argument("--quick", action="store_true", help="shorter runs for development")
    size.add_argument("--full", action="store_true", help="default plus 1M-vector indexes")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma list of sections")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    mode = MODES[
        "smoke" if args.smoke else "quick" if args.quick else "full" if args.full else "default"
    ]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        raise UsageError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    started = time.time()
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "mode": mode.name,
        "sections": [s for s in SECTIONS if s in only],
        "threads": args.threads,
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / result_stem(result)
    failed = []
    # Imported lazily: each section pulls in heavy libraries the others do not need.
    for section in (s for s in SECTIONS if s in only):
        t0 = time.perf_counter()
        log.info("=== %s (%s mode)", section, mode.name)
        try:
            module = __import__(f"benchmarks.{section}_bench", fromlist=["run"])
            result[section] = module.run(mode, args.threads, result)
        except Exception as exc:  # one broken section must not lose the others' figures
            log.exception("section %s failed", section)
            result[section] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(section)
        result[section]["seconds"] = round(time.perf_counter() - t0, 1)
        result["machine"]["load_avg_end"] = list(os.getloadavg())
        _write(result, stem)  # after every section: a later failure keeps what was measured
    log.info("wrote %s.json and .md in %.0f s", stem, time.time() - started)
    if failed:
        raise RunFailed(f"benchmark section(s) failed: {', '.join(failed)} (see the log above)")
    return result


def _write(result: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, stem.with_suffix(".md"))


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m benchmarks"))
