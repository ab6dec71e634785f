"""Bicubic resizing of a position-embedding grid written as two small matrix products.

``F.interpolate`` with a ``scale_factor`` (DINOv2's ``interpolate_offset`` form) traces into an
ONNX ``Resize`` whose scales are constants of the export size, so the graph is wrong at every
other size; and ``antialias`` needs a newer opset. Bicubic resizing is separable: the resized grid
is ``A_h @ grid @ A_w^T`` with ``A`` an ``[out, in]`` weight matrix. Computing ``A`` from the
output length with ordinary tensor ops keeps the graph dynamic in H and W and reproduces both
PyTorch kernels (plain bicubic with a given scale, and antialiased bicubic to a given size) to
float rounding, so an exported graph agrees with the official PyTorch interpolation at any size.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _cubic(x: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel at ``x``; zero for ``|x| >= 2``."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_matrix(out_len: int | Tensor, in_len: int, inv_scale: Tensor) -> Tensor:
    """``[out_len, in_len]`` weights of PyTorch's bicubic kernel (``align_corners=False``,
    a = -0.75, border taps clamped to the edge) where ``inv_scale`` is input/output pixels.

    With ``inv_scale = in_len / (out + offset)`` this is ``F.interpolate(scale_factor=...)``."""
    dst = torch.arange(out_len, dtype=torch.float32)
    src = (dst + 0.5) * inv_scale - 0.5  # cubic: no clamping of the source coordinate
    x0 = torch.floor(src)
    t = src - x0
    taps = torch.arange(in_len, dtype=torch.float32)
    mat = torch.zeros_like(src)[:, None] * taps[None, :]
    for k, dist in enumerate((t + 1, t, 1 - t, 2 - t)):
        pos = (x0 + (k - 1)).clamp(0, in_len - 1)
        mat = mat + _cubic(dist, -0.75)[:, None] * (pos[:, None] == taps[None, :]).float()
    return mat


def bicubic_aa_matrix(out_len: int | Tensor, in_len: int) -> Tensor:
    """``[out_len, in_len]`` weights of PyTorch's antialiased bicubic resize to an explicit size
    (a = -0.5 like PIL, the kernel widened by the downscale factor, taps outside the input
    dropped and each row renormalised)."""
    dst = torch.arange(out_len, dtype=torch.float32)
    scale = in_len / torch.as_tensor(out_len, dtype=torch.float32)
    stretch = torch.clamp(scale, min=1.0)  # widen only when shrinking
    centre = scale * (dst + 0.5)
    taps = torch.arange(in_len, dtype=torch.float32)
    weights = _cubic((taps[None, :] + 0.5 - centre[:, None]) / stretch, -0.5)
    return weights / weights.sum(dim=1, keepdim=True)


def resize_grid(grid: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Apply ``rows [h, M]`` and ``cols [w, M]`` to ``grid [M, M, D]``, giving the resized grid
    as row-major tokens ``[h*w, D]``.

    Only 2-D products with the dynamic matrix on the left: OpenVINO's CPU plugin turns them into
    fully connected layers and rejects broadcast batched products with a dynamic side."""
    m, _, dim = grid.shape
    by_col = cols @ grid.permute(1, 0, 2).reshape(m, -1)  # [w, M * D], contracted over columns
    by_col = by_col.reshape(-1, m, dim).permute(1, 0, 2).reshape(m, -1)  # [M, w * D]
    return (rows @ by_col).reshape(-1, dim)  # [h, w * D] -> [h * w, D]
