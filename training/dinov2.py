"""DINOv2 Vision Transformers with the parameter names of the official checkpoints.

The module tree (``cls_token``, ``pos_embed``, ``register_tokens``, ``mask_token``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.*,ls2.gamma}``,
``norm``) is that of facebookresearch/dinov2's ``DinoVisionTransformer``, so the published
``dinov2_*_pretrain.pth`` files load with ``strict=True``. Every hub model is built at
``img_size=518`` (a 37 x 37 position grid); images of other sizes get the grid resized exactly as
the official model does it (see ``interpolate_pos_encoding``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.pos_interp import bicubic_aa_matrix, bicubic_matrix, resize_grid
from training.vision_transformer import Attention, DropPath, Mlp, PatchEmbed

LAYER_NORM_EPS = 1e-6


def exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class LayerScale(nn.Module):
    """Per-channel residual scale ``gamma`` (CaiT), initialised small so deep nets start
    close to the identity."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class SwiGLUFused(nn.Module):
    """DINOv2's SwiGLU FFN: one ``w12`` projection split into gate and value, then ``w3``.
    The hidden width is 2/3 of the MLP's, rounded up to a multiple of 8 (4096 for ViT-g)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScaleBlock(nn.Module):
    """Pre-norm block with layerscale on both residual branches; returns (tokens, attention)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: nn.Module,
        attn: nn.Module | None = None,
        eps: float = LAYER_NORM_EPS,
        init_value: float = 1e-5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = attn if attn is not None else Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_value)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ffn
        self.ls2 = LayerScale(dim, init_value)
        self.drop_path = DropPath(drop_path_rate)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        y, attn = self.attn(self.norm1(x)) if rope is None else self.attn(self.norm1(x), rope)
        x = x + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, attn


class PrefixTokenViT(nn.Module):
    """What DINOv2 and DINOv3 ViTs share: CLS + ``n_register_tokens`` extra tokens before the
    patches, one final norm, outputs that leave the extra tokens out.

    Subclasses define ``embed(x, patch_mask, mask_token) -> (tokens, rope)``.
    """

    family = "vit"
    n_register_tokens = 0

    @property
    def n_prefix_tokens(self) -> int:
        return 1 + self.n_register_tokens

    def embed(
        self, x: Tensor, patch_mask: Tensor | None, mask_token: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        raise NotImplementedError

    def _check_size(self, x: Tensor) -> None:
        h, w = x.shape[-2:]
        p = self.patch_size
        if not exporting() and (h % p or w % p):
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")

    def _run(self, x: Tensor, patch_mask: Tensor | None = None, mask_token: Tensor | None = None):
        """Yield (tokens, attention) after each block."""
        tokens, rope = self.embed(x, patch_mask, mask_token)
        for block in self.blocks:
            tokens, attn = block(tokens, rope)
            yield tokens, attn

    def forward(self, x: Tensor) -> Tensor:
        """The official eval output: the CLS token after the final norm, ``[B, D]``."""
        return self.forward_tokens(x)[:, 0]

    def forward_tokens(
        self, x: Tensor, patch_mask: Tensor | None = None, mask_token: Tensor | None = None
    ) -> Tensor:
        """CLS then patch tokens after the final norm, ``[B, 1 + h*w, D]`` (register tokens left
        out, so token ``1 + i`` is patch ``i``); ``patch_mask [B, h*w]`` (True = hidden) swaps
        those patches for ``mask_token`` (default: the model's own ``mask_token``)."""
        *_, (tokens, _) = self._run(x, patch_mask, mask_token)
        tokens = self.norm(tokens)
        return torch.cat((tokens[:, :1], tokens[:, self.n_prefix_tokens :]), dim=1)

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Softmax attention of the last block, ``[B, heads, N, N]`` over every token
        (CLS, register tokens, patches)."""
        *_, (_, attn) = self._run(x)
        return attn

    def get_intermediate_layers(
        self, x: Tensor, n: int = 1, return_class_token: bool = False
    ) -> tuple:
        """As the official method: the patch tokens ``[B, h*w, D]`` of the last ``n`` blocks
        after the final norm (CLS and register tokens left out), with the CLS token ``[B, D]``
        as ``(patches, cls)`` pairs when ``return_class_token``."""
        outputs = []
        for i, (tokens, _) in enumerate(self._run(x)):
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(tokens))
        patches = [t[:, self.n_prefix_tokens :] for t in outputs]
        if return_class_token:
            return tuple(zip(patches, [t[:, 0] for t in outputs], strict=True))
        return tuple(patches)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What the served artifact needs: CLS ``[B, D]``, patch tokens ``[B, h*w, D]`` (both
        normed) and the last block's CLS-to-patch attention ``[B, heads, h*w]``."""
        *_, (tokens, attn) = self._run(x)
        tokens = self.norm(tokens)
        prefix = self.n_prefix_tokens
        return tokens[:, 0], tokens[:, prefix:], attn[:, :, 0, prefix:]


class DinoV2(PrefixTokenViT):
    """DINOv2's ViT. ``interpolate_offset`` 0.1 without antialias is the original models' way of
    resizing positions, ``0`` with antialias that of the register models."""

    lineage = "dinov2"

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        ffn: str = "mlp",
        n_register_tokens: int = 0,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        layerscale_init: float = 1e-5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.depth = img_size, patch_size, depth
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.n_register_tokens = n_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        grid = img_size // patch_size
        # Export parity also runs at the trained size by 3/4 of it (518 x 392 for the hub models).
        self.parity_far_size = (img_size, max(1, round(grid * 0.75)) * patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, n_register_tokens, embed_dim))
            if n_register_tokens
            else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        hidden = 4 * embed_dim
        self.blocks = nn.ModuleList(
            LayerScaleBlock(
                embed_dim,
                num_heads,
                SwiGLUFused(embed_dim, hidden) if ffn == "swiglu" else Mlp(embed_dim, hidden),
                init_value=layerscale_init,
                drop_path_rate=rate,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h_patches: int | Tensor, w_patches: int | Tensor) -> Tensor:
        """Positions for an ``h x w`` patch grid, ``[1, 1 + h*w, D]``.

        In PyTorch this is the official call itself (``F.interpolate`` with the offset scale
        factor, or to an explicit size with antialias). While exporting, the same resampling is
        written as matrix products computed from the traced grid size (``training.pos_interp``),
        which stays correct at every size; the export's parity check compares the two.
        """
        n_trained = self.pos_embed.shape[1] - 1
        m = int(math.sqrt(n_trained))
        if not exporting() and h_patches == m and w_patches == m:
            return self.pos_embed
        pos = self.pos_embed.float()
        dim = pos.shape[-1]
        if exporting():
            h, w = torch.as_tensor(h_patches), torch.as_tensor(w_patches)
            same = (h == m) & (w == m)
            rows, cols = self._matrix(h, m, same), self._matrix(w, m, same)
            patch_pos = resize_grid(pos[0, 1:].reshape(m, m, dim), rows, cols)[None]
        else:
            grid = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
            if self.interpolate_offset:
                offset = self.interpolate_offset
                scale = ((h_patches + offset) / m, (w_patches + offset) / m)
                grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
            else:
                size = (int(h_patches), int(w_patches))
                grid = F.interpolate(
                    grid, size=size, mode="bicubic", antialias=self.interpolate_antialias
                )
            patch_pos = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((pos[:, :1], patch_pos), dim=1).to(self.pos_embed.dtype)

    def _matrix(self, n: Tensor, m: int, same: Tensor) -> Tensor:
        if self.interpolate_antialias:
            return bicubic_aa_matrix(n, m)
        if not self.interpolate_offset:
            return bicubic_matrix(n, m, m / torch.as_tensor(n, dtype=torch.float32))
        n = torch.as_tensor(n, dtype=torch.float32)
        # At the trained grid the official model skips interpolation: scale 1 is the identity.
        inv_scale = torch.where(same, torch.ones(()), m / (n + self.interpolate_offset))
        return bicubic_matrix(n.long(), m, inv_scale)

    def embed(
        self, x: Tensor, patch_mask: Tensor | None, mask_token: Tensor | None
    ) -> tuple[Tensor, None]:
        """Official order: patches, mask, CLS, positions, then the register tokens after CLS."""
        self._check_size(x)
        h, w = x.shape[-2:]
        tokens = self.patch_embed(x)
        if patch_mask is not None:
            token = self.mask_token if mask_token is None else mask_token.reshape(1, -1)
            tokens = torch.where(patch_mask.unsqueeze(-1), token.to(tokens.dtype), tokens)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h // self.patch_size, w // self.patch_size)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)
        return tokens, None


_V2_SIZES = {
    "s": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "b": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "l": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "g": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn": "swiglu"},
}
_REGISTERS = {"n_register_tokens": 4, "interpolate_offset": 0.0, "interpolate_antialias": True}
DINOV2_CONFIGS: dict[str, dict] = {
    **{f"dinov2_vit{k}14": dict(v) for k, v in _V2_SIZES.items()},
    **{f"dinov2_vit{k}14_reg": {**v, **_REGISTERS} for k, v in _V2_SIZES.items()},
}


def build_dinov2(arch: str, **kw: object) -> DinoV2:
    """The official configuration of a hub name; ``kw`` overrides (e.g. depth, embed_dim for
    small test models, img_size for training at another size)."""
    return DinoV2(**{**DINOV2_CONFIGS[arch], **kw})
