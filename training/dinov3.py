"""DINOv3 Vision Transformers with the parameter names of the official checkpoints.

The module tree (``cls_token``, ``storage_tokens``, ``mask_token``, ``patch_embed.proj``,
``rope_embed.periods``, ``blocks.N.{norm1,attn.qkv(+bias_mask),attn.proj,ls1.gamma,norm2,mlp.*,
ls2.gamma}``, ``norm``) is that of facebookresearch/dinov3's ``DinoVisionTransformer``, so the
published ``dinov3_vit*_pretrain_lvd1689m-*.pth`` files load with ``strict=True``.

Positions are rotary (RoPE) over patch coordinates normalised to [-1, 1] per axis, so any
image size works without resizing anything, and the exported graph computes the same angles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.dinov2 import LayerScaleBlock, PrefixTokenViT
from training.vision_transformer import Mlp, PatchEmbed

LAYER_NORM_EPS = 1e-5


class RopePositionEmbedding(nn.Module):
    """Axial rotary embedding: per patch, angles ``2 pi coord / period`` for the row and the
    column coordinate, each over ``head_dim / 4`` periods ``base ** (4 i / head_dim)``.
    In training the coordinates are rescaled by a log-uniform factor in [1/r, r]."""

    def __init__(
        self, embed_dim: int, num_heads: int, base: float = 100.0, rescale: float | None = 2.0
    ) -> None:
        super().__init__()
        head_dim = embed_dim // num_heads
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head width divisible by 4, got {head_dim}")
        self.rescale = rescale
        exponent = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
        self.register_buffer("periods", base**exponent, persistent=True)

    def forward(self, h: int | Tensor, w: int | Tensor) -> tuple[Tensor, Tensor]:
        """``(sin, cos)``, each ``[h*w, head_dim]``."""
        device = self.periods.device
        ys = torch.arange(0.5, h, device=device, dtype=torch.float32) / h
        xs = torch.arange(0.5, w, device=device, dtype=torch.float32) / w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        if self.training and self.rescale is not None:
            log_r = math.log(self.rescale)
            coords = coords * torch.empty(1, device=device).uniform_(-log_r, log_r).exp()
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate the patch tokens of ``x [B, heads, N, d]`` (the last ``sin.shape[0]``); the
    prefix (CLS, storage) tokens are left as they are."""
    start = x.shape[-2] - sin.shape[-2]
    patches = x[:, :, start:].float()
    half = patches.shape[-1] // 2
    rotated = torch.cat((-patches[..., half:], patches[..., :half]), dim=-1)
    patches = (patches * cos + rotated * sin).to(x.dtype)
    return torch.cat((x[:, :, :start], patches), dim=-2)


class LinearKMaskedBias(nn.Linear):
    """The qkv projection whose key bias is switched off by the ``bias_mask`` buffer (1 for q
    and v, 0 for k): a key bias only shifts every logit of a query equally."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__(dim, out)
        mask = torch.ones(out)
        mask[out // 3 : 2 * out // 3] = 0
        self.register_buffer("bias_mask", mask, persistent=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class RopeAttention(nn.Module):
    """Self-attention with RoPE on q and k; returns the softmax weights as well (for maps)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = LinearKMaskedBias(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out), attn


class SwiGLU(nn.Module):
    """DINOv3's SwiGLU FFN (``w1`` gate, ``w2`` value, ``w3`` out); hidden 2/3 of the MLP's,
    rounded up to a multiple of 8."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        d = int(hidden * 2 / 3)
        d += -d % 8
        self.w1, self.w2, self.w3 = nn.Linear(dim, d), nn.Linear(dim, d), nn.Linear(d, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class DinoV3(PrefixTokenViT):
    """DINOv3's ViT: CLS, ``n_register_tokens`` storage tokens, then patches; RoPE positions."""

    lineage = "dinov3"

    def __init__(
        self,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        ffn: str = "mlp",
        ffn_ratio: float = 4.0,
        n_register_tokens: int = 4,
        layerscale_init: float = 1e-5,
        drop_path_rate: float = 0.0,
        img_size: int = 224,
    ) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.depth = img_size, patch_size, depth
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.n_register_tokens = n_register_tokens
        # Export parity also runs far from the served size and non-square (e.g. 512 x 384).
        far = round(img_size * 16 / 7 / patch_size) * patch_size
        self.parity_far_size = (far, round(far * 0.75 / patch_size) * patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, n_register_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.rope_embed = RopePositionEmbedding(embed_dim, num_heads)
        hidden = int(embed_dim * ffn_ratio)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            LayerScaleBlock(
                embed_dim,
                num_heads,
                SwiGLU(embed_dim, hidden) if ffn == "swiglu" else Mlp(embed_dim, hidden),
                attn=RopeAttention(embed_dim, num_heads),
                eps=LAYER_NORM_EPS,
                init_value=layerscale_init,
                drop_path_rate=rate,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.storage_tokens, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def embed(
        self, x: Tensor, patch_mask: Tensor | None, mask_token: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """CLS, storage tokens, patch embeddings (masked ones swapped for the mask token), and
        the RoPE angles of this patch grid."""
        self._check_size(x)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x)
        if patch_mask is not None:
            token = self.mask_token if mask_token is None else mask_token.reshape(1, -1)
            tokens = torch.where(patch_mask.unsqueeze(-1), token.to(tokens.dtype), tokens)
        b = tokens.shape[0]
        prefix = (self.cls_token.expand(b, -1, -1), self.storage_tokens.expand(b, -1, -1))
        return torch.cat((*prefix, tokens), dim=1), self.rope_embed(h, w)


_V3_SIZES = {
    "s": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "splus": {"embed_dim": 384, "depth": 12, "num_heads": 6, "ffn": "swiglu", "ffn_ratio": 6.0},
    "b": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "l": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}
DINOV3_CONFIGS: dict[str, dict] = {
    ("dinov3_vits16plus" if k == "splus" else f"dinov3_vit{k}16"): v for k, v in _V3_SIZES.items()
}


def build_dinov3(arch: str, **kw: object) -> DinoV3:
    """The official configuration of a hub name; ``kw`` overrides (e.g. a smaller depth)."""
    return DinoV3(**{**DINOV3_CONFIGS[arch], **kw})
