"""DINOv3's ConvNeXt backbones with the parameter names of the official checkpoints.

The module tree (``downsample_layers.{0..3}``, ``stages.S.B.{dwconv,norm,pwconv1,pwconv2,gamma}``,
``norm`` and its alias ``norms.3``) is that of facebookresearch/dinov3's ``ConvNeXt``, so the
published ``dinov3_convnext_*_pretrain_lvd1689m-*.pth`` files load with ``strict=True``.
``forward`` is the official eval output: the global average of the last stage, through the final
norm. Any input size works (multiples of 32 keep every stage's grid whole).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.vision_transformer import DropPath

EPS = 1e-6


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``[B, C, H, W]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + EPS)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm, 4x MLP, layer scale ``gamma``, residual."""

    def __init__(self, dim: int, drop_path_rate: float = 0.0, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # channels last for the norm and the MLP
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """Stem (4x4 stride 4) then four stages, each after a 2x2 stride-2 downsample but the first."""

    family = "convnext"
    lineage = "dinov3"
    patch_size = None
    num_heads = None

    def __init__(
        self,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale: float = 1e-6,
    ) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), ChannelsFirstLayerNorm(dims[0]))
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(
                nn.Sequential(
                    ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)
                )
            )
        total = sum(depths)
        rates = iter([drop_path_rate * i / max(total - 1, 1) for i in range(total)])
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(dim, next(rates), layer_scale) for _ in range(depth)))
            for dim, depth in zip(dims, depths, strict=True)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=EPS)
        # The official class lists the final norm again as ``norms.3`` (one module, two names).
        self.norms = nn.ModuleList([nn.Identity() for _ in dims[:-1]] + [self.norm])
        self.embed_dim = self.num_features = dims[-1]
        self.depth = None
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def feature_map(self, x: Tensor) -> Tensor:
        """The last stage's map ``[B, C, H/32, W/32]`` (before the final norm)."""
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Pooled, normalised features ``[B, C]`` (the official ``x_norm_clstoken``)."""
        return self.norm(self.feature_map(x).mean(dim=(-2, -1)))

    def forward_patch_tokens(self, x: Tensor) -> Tensor:
        """The official ``x_norm_patchtokens``: each position of the last map, normed,
        ``[B, H/32 * W/32, C]``."""
        return self.norm(self.feature_map(x).flatten(2).transpose(1, 2))


CONVNEXT_CONFIGS: dict[str, dict] = {
    "dinov3_convnext_tiny": {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)},
    "dinov3_convnext_small": {"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768)},
    "dinov3_convnext_base": {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)},
    "dinov3_convnext_large": {"depths": (3, 3, 27, 3), "dims": (192, 384, 768, 1536)},
}


def build_convnext(arch: str, **kw: object) -> ConvNeXt:
    """The official configuration of a hub name; ``kw`` overrides (``depths``, ``dims``)."""
    return ConvNeXt(**{**CONVNEXT_CONFIGS[arch], **kw})
