"""Independent reference forwards of the official DINOv2 / DINOv3 ViTs and ConvNeXt, written
from their published definitions straight on a state dict (no module of ``training`` used), and
helpers shared by the family tests."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

KEYS_DIR = Path(__file__).parent / "data" / "official_keys"


def official_keys(name: str) -> list[tuple[str, list[int]]]:
    """(key, shape) of the official state dict, trimmed to the first block of each stage."""
    rows = []
    for line in (KEYS_DIR / f"{name}.keys.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            rows.append((key, [int(s) for s in shape.strip("[]").split(",") if s.strip()]))
    return rows


def trim(keys: list[str]) -> list[str]:
    """Keep what the key files keep: everything but blocks/stage members after the first."""
    out = []
    for key in keys:
        parts = key.split(".")
        if parts[0] == "blocks" and parts[1] != "0":
            continue
        if parts[0] == "stages" and parts[2] != "0":
            continue
        out.append(key)
    return out


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> dict[str, Tensor]:
    """Every float tensor random (layerscale and norms too), so no term can hide behind an
    identity init; buffers that are constants of the architecture are kept."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in model.state_dict().items():
        if key.endswith(("periods", "bias_mask")):
            sd[key] = value.clone()
        elif key.startswith("norms.3."):  # ConvNeXt: a second name of ``norm``, same tensors
            sd[key] = sd[key.replace("norms.3.", "norm.")]
        else:
            sd[key] = torch.randn(value.shape, generator=gen) * std
    return sd


def layer_norm(x: Tensor, sd: dict, prefix: str, eps: float) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]


def linear(x: Tensor, sd: dict, prefix: str) -> Tensor:
    return x @ sd[f"{prefix}.weight"].T + sd[f"{prefix}.bias"]


def rotate(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def attention(x: Tensor, sd: dict, p: str, heads: int, rope=None, k_bias_mask=False) -> Tensor:
    b, n, d = x.shape
    bias = sd[f"{p}.qkv.bias"] * (sd[f"{p}.qkv.bias_mask"] if k_bias_mask else 1)
    qkv = (x @ sd[f"{p}.qkv.weight"].T + bias).reshape(b, n, 3, heads, d // heads)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    if rope is not None:
        sin, cos = rope
        start = n - sin.shape[0]
        q = torch.cat((q[:, :, :start], rotate(q[:, :, start:], sin, cos)), 2)
        k = torch.cat((k[:, :, :start], rotate(k[:, :, start:], sin, cos)), 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, d)
    return linear(out, sd, f"{p}.proj")


def ffn(x: Tensor, sd: dict, p: str) -> Tensor:
    if f"{p}.w12.weight" in sd:  # DINOv2 fused SwiGLU
        a, g = linear(x, sd, f"{p}.w12").chunk(2, -1)
        return linear(F.silu(a) * g, sd, f"{p}.w3")
    if f"{p}.w1.weight" in sd:  # DINOv3 SwiGLU
        return linear(F.silu(linear(x, sd, f"{p}.w1")) * linear(x, sd, f"{p}.w2"), sd, f"{p}.w3")
    return linear(F.gelu(linear(x, sd, f"{p}.fc1")), sd, f"{p}.fc2")


def vit_blocks(x: Tensor, sd: dict, heads: int, eps: float, rope=None, k_mask=False):
    """Prenorm tokens after every block."""
    outs = []
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}"
        y = attention(layer_norm(x, sd, f"{p}.norm1", eps), sd, f"{p}.attn", heads, rope, k_mask)
        x = x + y * sd[f"{p}.ls1.gamma"]
        x = x + ffn(layer_norm(x, sd, f"{p}.norm2", eps), sd, f"{p}.mlp") * sd[f"{p}.ls2.gamma"]
        outs.append(x)
    return outs


def dinov2_positions(sd: dict, h: int, w: int, offset: float, antialias: bool) -> Tensor:
    """The official resize: skip at the trained square grid, else bicubic with the offset scale
    factor (originals) or to an explicit size with antialias (register models)."""
    pos = sd["pos_embed"]
    m = int(math.sqrt(pos.shape[1] - 1))
    if h == m and w == m:
        return pos
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        grid = F.interpolate(
            grid, scale_factor=((h + offset) / m, (w + offset) / m), mode="bicubic"
        )
    else:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)
    return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)), 1)


def dinov2_reference(
    sd: dict, x: Tensor, heads: int, patch: int, registers: int, offset: float, mask=None
):
    """(prenorm tokens per block, normed final tokens) of DINOv2 with CLS, registers, patches;
    ``mask [B, h*w]`` swaps those patch embeddings for ``mask_token``."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    h, w = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    if mask is not None:
        t = torch.where(mask[..., None], sd["mask_token"][None], t)
    t = torch.cat((sd["cls_token"].expand(len(x), -1, -1), t), 1)
    t = t + dinov2_positions(sd, h, w, offset, antialias=not offset)
    if registers:
        t = torch.cat((t[:, :1], sd["register_tokens"].expand(len(x), -1, -1), t[:, 1:]), 1)
    outs = vit_blocks(t, sd, heads, 1e-6)
    return outs, layer_norm(outs[-1], sd, "norm", 1e-6)


def dinov3_rope(periods: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """sin, cos ``[h*w, head_dim]``: row-major patch centres in [-1, 1] per axis, the row angle
    block then the column angle block, repeated twice."""
    ys = ((torch.arange(h) + 0.5) / h) * 2 - 1
    xs = ((torch.arange(w) + 0.5) / w) * 2 - 1
    rows, cols = ys.repeat_interleave(w), xs.repeat(h)
    half = torch.cat((rows[:, None] / periods, cols[:, None] / periods), 1) * 2 * math.pi
    angles = torch.cat((half, half), 1)
    return angles.sin(), angles.cos()


def dinov3_reference(sd: dict, x: Tensor, heads: int, patch: int, mask=None):
    """(prenorm tokens per block, normed final tokens) of DINOv3 with CLS, storage, patches."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    h, w = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    if mask is not None:
        t = torch.where(mask[..., None], sd["mask_token"][None], t)
    b = len(x)
    t = torch.cat((sd["cls_token"].expand(b, -1, -1), sd["storage_tokens"].expand(b, -1, -1), t), 1)
    rope = dinov3_rope(sd["rope_embed.periods"], h, w)
    outs = vit_blocks(t, sd, heads, 1e-5, rope, k_mask=True)
    return outs, layer_norm(outs[-1], sd, "norm", 1e-5)


def channels_first_norm(x: Tensor, sd: dict, prefix: str) -> Tensor:
    return layer_norm(x.permute(0, 2, 3, 1), sd, prefix, 1e-6).permute(0, 3, 1, 2)


def convnext_reference(sd: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    """(pooled normed features, normed last-stage tokens) of DINOv3's ConvNeXt."""
    x = F.conv2d(x, sd["downsample_layers.0.0.weight"], sd["downsample_layers.0.0.bias"], stride=4)
    x = channels_first_norm(x, sd, "downsample_layers.0.1")
    for s in range(4):
        if s:
            x = channels_first_norm(x, sd, f"downsample_layers.{s}.0")
            w, b = sd[f"downsample_layers.{s}.1.weight"], sd[f"downsample_layers.{s}.1.bias"]
            x = F.conv2d(x, w, b, stride=2)
        n = len({k.split(".")[2] for k in sd if k.startswith(f"stages.{s}.")})
        for i in range(n):
            p = f"stages.{s}.{i}"
            y = F.conv2d(
                x, sd[f"{p}.dwconv.weight"], sd[f"{p}.dwconv.bias"], padding=3, groups=x.shape[1]
            )
            y = layer_norm(y.permute(0, 2, 3, 1), sd, f"{p}.norm", 1e-6)
            y = linear(F.gelu(linear(y, sd, f"{p}.pwconv1")), sd, f"{p}.pwconv2") * sd[f"{p}.gamma"]
            x = x + y.permute(0, 3, 1, 2)
    tokens = torch.cat((x.mean((-2, -1))[:, None], x.flatten(2).transpose(1, 2)), 1)
    normed = layer_norm(tokens, sd, "norm", 1e-6)
    return normed[:, 0], normed[:, 1:]
