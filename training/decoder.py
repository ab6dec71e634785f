"""A small decoder from a backbone's patch-token grid back to the image.

Resize-then-convolve (nearest x2 upsampling followed by 3x3 convolutions) instead of transposed
convolutions, which leave checkerboard patterns. Border handling is a flag because zero padding
shows the network a black frame that is not in the data:

- ``zeros``: every convolution zero-pads (the usual default, and the artefact to avoid);
- ``reflect``: every convolution reflect-pads;
- ``pad-crop``: the token grid is reflect-padded by ``margin`` tokens on every side, the
  convolutions zero-pad, and the output is cropped back, so whatever the zero padding does
  falls in the margin that is thrown away.

Input ``[B, D, h, w]`` (patch tokens reshaped row-major to the patch grid), output RGB in [0, 1]
``[B, 3, h * patch, w * patch]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PADDINGS = ("zeros", "reflect", "pad-crop")


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class UpBlock(nn.Module):
    """x2 nearest upsampling, then two 3x3 conv + GroupNorm + GELU."""

    def __init__(self, c_in: int, c_out: int, padding_mode: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode=padding_mode)
        self.norm1 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, padding_mode=padding_mode)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(self.norm2(self.conv2(x)))


class PatchDecoder(nn.Module):
    """Patch-token grid -> image. ``width`` channels after the 1x1 stem, halved per x2 stage
    (never below ``min_width``); ``ceil(log2(patch))`` stages, then an exact resize when the patch
    is not a power of two."""

    def __init__(
        self,
        embed_dim: int,
        patch_size: int,
        padding: str = "reflect",
        width: int = 128,
        min_width: int = 32,
        margin: int = 2,
    ) -> None:
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if patch_size < 1 or embed_dim < 1:
            raise ValueError("patch_size and embed_dim must be positive")
        if padding == "pad-crop" and margin < 1:
            raise ValueError("pad-crop needs a margin of at least 1 token")
        self.embed_dim, self.patch_size, self.padding = embed_dim, patch_size, padding
        self.margin = margin if padding == "pad-crop" else 0
        mode = "reflect" if padding == "reflect" else "zeros"
        self.stem = nn.Sequential(
            nn.Conv2d(embed_dim, width, 1), nn.GroupNorm(_groups(width), width), nn.GELU()
        )
        blocks, c = [], width
        for _ in range(max(0, math.ceil(math.log2(patch_size)))):
            c_out = max(min_width, c // 2)
            blocks.append(UpBlock(c, c_out, mode))
            c = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(c, 3, 3, padding=1, padding_mode=mode)
        self.config = {
            "embed_dim": embed_dim,
            "patch_size": patch_size,
            "padding": padding,
            "width": width,
            "min_width": min_width,
            "margin": margin,
        }

    def forward(self, grid: Tensor) -> Tensor:
        if grid.ndim != 4 or grid.shape[1] != self.embed_dim:
            raise ValueError(
                f"expected a token grid [B, {self.embed_dim}, h, w], got {tuple(grid.shape)}"
            )
        h, w = grid.shape[-2:]
        m = self.margin
        if m:
            # A grid smaller than the margin cannot be reflected; replicate then (rare: 1-2 tokens).
            small = h <= m or w <= m
            grid = F.pad(grid, (m, m, m, m), mode="replicate" if small else "reflect")
        x = self.stem(grid)
        for block in self.blocks:
            x = block(x)
        p = self.patch_size
        out_h, out_w = (h + 2 * m) * p, (w + 2 * m) * p
        if x.shape[-2:] != (out_h, out_w):
            x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)
        x = torch.sigmoid(self.head(x))
        if m:
            x = x[:, :, m * p : (h + m) * p, m * p : (w + m) * p]
        return x


def tokens_to_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Patch tokens ``[B, h*w, D]`` (row-major) -> ``[B, D, h, w]``."""
    b, n, d = tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(b, d, h, w)
