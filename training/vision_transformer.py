"""Vision Transformer with the parameter names of the official DINO checkpoints.

The module tree (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,
attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) matches the published DINO ViTs, so their
``state_dict`` loads with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYER_NORM_EPS = 1e-6


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention returning the softmax weights as well.

    The explicit ``softmax(q k^T) v`` (rather than the fused kernel) is deliberate: the weights are
    needed for attention maps, and on CPU at short sequences it trains faster in bf16.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(attn_drop)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out)), attn


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=drop)
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, attn = self.attn(self.norm1(x))
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINO's ViT: ``forward`` gives the CLS token after the final norm, ``[B, D]``."""

    family = "vit"

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h_patches: int | Tensor, w_patches: int | Tensor) -> Tensor:
        """Positional embedding for an ``h x w`` patch grid, bicubic from the trained grid.

        Identity at the trained grid. The grid is resized to an explicit output size (not DINO's
        ``scale_factor + 0.1``) because only that form stays dynamic in an exported ONNX graph;
        the two agree to cosine ~0.999999 at other sizes. While exporting, the interpolation is
        always traced (bicubic to the same size is the identity) so no size is baked in.
        """
        n_trained = self.pos_embed.shape[1] - 1
        grid = int(math.sqrt(n_trained))
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if not exporting and h_patches == grid and w_patches == grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos, size=(h_patches, w_patches), mode="bicubic", align_corners=False
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def prepare_tokens(
        self, x: Tensor, patch_mask: Tensor | None = None, mask_token: Tensor | None = None
    ) -> Tensor:
        """CLS + patch embeddings + positions; ``patch_mask`` ``[B, h*w]`` (True = hidden)
        replaces those patch embeddings by ``mask_token`` ``[D]`` before the positions are added
        (iBOT's masked image modelling, ``training.masked_patches``)."""
        _, _, h, w = x.shape
        p = self.patch_size
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()) and (h % p or w % p):
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(x)
        if patch_mask is not None:
            if mask_token is None:
                raise ValueError("a patch_mask needs the mask_token that replaces hidden patches")
            hidden = patch_mask.unsqueeze(-1)
            tokens = torch.where(hidden, mask_token.to(tokens.dtype), tokens)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h // p, w // p)
        return self.pos_drop(tokens)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_tokens(x)[:, 0]

    def forward_tokens(
        self, x: Tensor, patch_mask: Tensor | None = None, mask_token: Tensor | None = None
    ) -> Tensor:
        """Every token after the final norm, ``[B, 1 + h*w, D]`` (CLS first); masking as in
        ``prepare_tokens``."""
        x = self.prepare_tokens(x, patch_mask, mask_token)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Softmax attention of the last block, ``[B, heads, N, N]`` (N = 1 + patches)."""
        x = self.prepare_tokens(x)
        attn = None
        for block in self.blocks:
            x, attn = block(x)
        return attn

    def get_intermediate_layers(self, x: Tensor, n: int = 1) -> list[Tensor]:
        """Normalised token sequences ``[B, N, D]`` of the last ``n`` blocks."""
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x, _ = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One pass giving what the served artifact needs.

        Returns the CLS embedding ``[B, D]``, patch tokens ``[B, h*w, D]`` (both after the final
        norm) and the last block's CLS-to-patch attention ``[B, heads, h*w]``.
        """
        x = self.prepare_tokens(x)
        attn = None
        for block in self.blocks:
            x, attn = block(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1:], attn[:, :, 0, 1:]


VIT_SIZES: dict[str, dict[str, int]] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}


def build_vit(arch: str, patch_size: int = 16, **kw: object) -> VisionTransformer:
    """A ViT of a named size; ``kw`` overrides any constructor argument (e.g. depth, img_size)."""
    if arch not in VIT_SIZES:
        raise ValueError(f"unknown ViT arch {arch!r}; choose one of {sorted(VIT_SIZES)}")
    args = {**VIT_SIZES[arch], "patch_size": patch_size, **kw}
    return VisionTransformer(**args)
