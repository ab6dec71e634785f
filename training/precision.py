"""Which floating-point precision a run computes in: bf16 where the hardware has it, else fp32."""

from __future__ import annotations

import contextlib

import torch

from artifact.cpu import cpu_has_bf16


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA with bf16 support or a bf16-capable CPU, else ``fp32``."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for a resolved ``bf16`` precision, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
