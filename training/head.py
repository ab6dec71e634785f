"""DINO projection head, the multi-crop wrapper and the optimiser helpers that go with them.

Parameter names follow the official DINO code (``mlp.0/2/4``, ``last_layer.weight_g/weight_v``;
``backbone.*``/``head.*`` in the wrapper) so that official training checkpoints load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """``y = x W^T`` with ``W = g * V / ||V||`` (row-wise norm), no bias.

    Written out rather than using ``torch.nn.utils.parametrizations.weight_norm`` because that
    renames the parameters (``parametrizations.weight.original0``) and official checkpoints store
    ``weight_g`` ``[out, 1]`` and ``weight_v`` ``[out, in]``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        v = torch.empty(out_features, in_features)
        # nn.Linear's default initialisation, as the official head leaves this layer at default.
        nn.init.kaiming_uniform_(v, a=5**0.5)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    """MLP (GELU, optional BN) to a bottleneck, L2 normalisation, weight-normalised prototypes.

    ``norm_last_layer=True`` freezes ``weight_g`` at 1 so every prototype has unit norm, which
    the paper found stabilises training of ViTs.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) <= 0:
            raise ValueError("head dimensions must be positive")
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(nlayers - 2):
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)]
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.norm_last_layer = norm_last_layer
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        # eps as in the official head: keeps an all-zero bottleneck vector finite.
        x = F.normalize(x, dim=-1, p=2, eps=1e-12)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of same-resolution crops, then the head once on all.

    Crops of one resolution are batched together (2 globals, then the locals) so each backbone
    call sees a single tensor shape; the output rows are crop-major: crop 0's batch, crop 1's...
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, crops: list[Tensor] | Tensor, return_backbone: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Head outputs ``[n*B, K]``; with ``return_backbone`` also the backbone's ``[n*B, D]``."""
        if isinstance(crops, Tensor):
            crops = [crops]
        if not crops:
            raise ValueError("MultiCropWrapper got an empty list of crops")
        features = []
        start = 0
        while start < len(crops):
            size = crops[start].shape[-2:]
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == size:
                end += 1
            out = self.backbone(torch.cat(crops[start:end]))
            # torchvision-style backbones may return a tuple; DINO takes the first element.
            features.append(out[0] if isinstance(out, tuple) else out)
            start = end
        backbone_out = torch.cat(features)
        head_out = self.head(backbone_out)
        return (head_out, backbone_out) if return_backbone else head_out


def cancel_last_layer_gradients(
    model: nn.Module, epoch: int, freeze_last_layer_epochs: int
) -> None:
    """Drop the prototypes' gradients during the first epochs (DINO: 1), which the paper
    found needed for stable starts. Call between ``backward()`` and ``optimizer.step()``."""
    if epoch >= freeze_last_layer_epochs:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


def get_params_groups(model: nn.Module) -> list[dict]:
    """Two optimiser groups, as DINO: group 0 decayed, group 1 (biases and all 1-D parameters,
    i.e. norm weights) with ``weight_decay=0``. Frozen parameters are left out.

    A weight-decay schedule should only change group 0.
    """
    regularized: list[nn.Parameter] = []
    not_regularized: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]
