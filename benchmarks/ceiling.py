"""Measured matrix-multiply ceilings (GFLOP/s) of this CPU per precision, with PyTorch's GEMM
(oneDNN: AVX-512 for fp32, AMX/AVX-512-BF16 for bf16). The int8 figure uses ``torch._int_mm``,
which may not reach the AMX-INT8 peak: treat fractions of it as upper bounds."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def gemm_gflops(precision: str, n: int, min_time: float, threads: int) -> float:
    import torch

    from benchmarks.common import throughput

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    if precision == "int8":
        a = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=gen)
        b = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=gen)

        def mm():
            return torch._int_mm(a, b)
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)

        def mm():
            return a @ b

    return throughput(mm, 1, min_time) * 2 * n**3 / 1e9


# A precision is measured only where the CPU has instructions for it: elsewhere PyTorch emulates
# it (bf16 at 1/10 of fp32 on AVX2), and a fraction of that "ceiling" would mean nothing.
NATIVE = {
    "bf16": {"avx512_bf16", "amx_bf16"},
    "int8": {"avx512_vnni", "avx_vnni", "amx_int8"},
}


def ceilings(min_time: float, threads: int, n: int = 2048) -> dict[str, float]:
    from artifact.cpu import cpu_flags

    flags = set(cpu_flags())
    out = {}
    for precision in ("fp32", "bf16", "int8"):
        if precision in NATIVE and not NATIVE[precision] & flags:
            log.info("no %s ceiling: this CPU has none of %s", precision, sorted(NATIVE[precision]))
            continue
        try:
            out[precision] = round(gemm_gflops(precision, n, min_time, threads), 1)
        except (RuntimeError, AttributeError) as exc:  # no int8 GEMM in this torch build
            log.warning("no %s GEMM ceiling: %s", precision, exc)
        log.info("GEMM ceiling %s: %s GFLOP/s", precision, out.get(precision))
    return out
