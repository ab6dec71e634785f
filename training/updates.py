"""The two parameter updates of a DINO step besides the optimiser's: the EMA teacher and DINO's
per-parameter gradient clipping."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- m * teacher + (1 - m) * student`` for every parameter."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's clipping: each parameter's gradient norm is capped at ``clip`` separately."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    # One fused pass over all gradients instead of two small kernels per parameter.
    norms = torch.stack(torch._foreach_norm(grads, 2))
    scales = torch.clamp(clip / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))
