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


def cpu_family() -> str:
    """The CPU's class for speed figures, by its matrix extensions: ``AMX`` (bf16 and int8
    tiles), ``AVX-512 BF16/VNNI``, ``AVX-512 VNNI``, ``AVX-512``, ``AVX2 only``, or ``other``.
    The best engine and precision differ between these classes, not between vendors."""
    have = set(cpu_flags())
    if {"amx_bf16", "amx_int8"} & have:
        return "AMX"
    if "avx512f" in have:
        if "avx512_bf16" in have and "avx512_vnni" in have:
            return "AVX-512 BF16/VNNI"
        return "AVX-512 VNNI" if "avx512_vnni" in have else "AVX-512"
    return "AVX2 only" if "avx2" in have else "other"
