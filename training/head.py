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

    ``mask_token_dim`` adds iBOT's learnable mask token (``mask_token``, outside the backbone so
    the backbone's state dict stays the official one); ``forward(..., patch_positions=...)``
    then also returns the head's outputs for those patch tokens of the two global crops.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, mask_token_dim: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mask_token = None
        if mask_token_dim:
            self.mask_token = nn.Parameter(torch.zeros(mask_token_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(
        self,
        crops: list[Tensor] | Tensor,
        return_backbone: bool = False,
        patch_positions: Tensor | None = None,
        mask_patches: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        """Head outputs ``[n*B, K]``; with ``return_backbone`` also the backbone's ``[n*B, D]``.

        With ``patch_positions`` (``[2B, h*w]`` bool over the first two crops) the result is
        ``(head_out, backbone_out, patch_head_out [positions.sum(), K])``; ``mask_patches``
        hides those patches behind the mask token first (the student), without it they are seen
        (the teacher).
        """
        if isinstance(crops, Tensor):
            crops = [crops]
        if not crops:
            raise ValueError("MultiCropWrapper got an empty list of crops")
        features = []
        patch_features = None
        start = 0
        if patch_positions is not None:
            if len(crops) < 2 or crops[0].shape != crops[1].shape:
                raise ValueError("patch_positions need the two global crops first, same size")
            own = getattr(self.backbone, "mask_token", None)  # DINOv2/v3 carry their own
            if mask_patches and self.mask_token is None and own is None:
                raise ValueError("mask_patches needs a wrapper built with mask_token_dim")
            tokens = self.backbone.forward_tokens(
                torch.cat(crops[:2]),
                patch_positions if mask_patches else None,
                self.mask_token,
            )
            features.append(tokens[:, 0])
            patch_features = tokens[:, 1:][patch_positions]
            start = 2
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
        if patch_features is not None:
            # A head call of their own: the head's BatchNorm keeps CLS-only batch statistics.
            return head_out, backbone_out, self.head(patch_features)
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
