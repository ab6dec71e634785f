"""What the CPU offers, from ``/proc/cpuinfo`` (Linux; elsewhere nothing is reported)."""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> list[str]:
    """The first CPU's feature flags, sorted; empty where ``/proc/cpuinfo`` cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            return sorted(line.split(":", 1)[1].split())
    return []


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units (AMX) or AVX-512 bf16 instructions: what makes bf16 autocast
    worth it on a CPU."""
    return bool(set(BF16_FLAGS) & set(cpu_flags()))
