"""Shared bits of the reliability tests: a live process's RSS, and recording the figures.

Figures go to the JSON file named by ``DINO_RELIABILITY_JSON`` (one section per test, merged),
e.g. ``DINO_RELIABILITY_JSON=benchmarks/results/reliability.json``; without it nothing is written,
so an ordinary test run leaves the tree clean.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process (Linux /proc), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS line for pid {pid}")


def record(section: str, figures: dict) -> None:
    """Merge ``figures`` under ``section`` into the results file (when one is named)."""
    target = os.environ.get("DINO_RELIABILITY_JSON")
    if not target:
        return
    path = Path(target)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[section] = figures
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
