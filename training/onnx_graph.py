"""Trace a backbone into one self-contained ONNX graph with dynamic batch and image size.

Exporter choice: the legacy TorchScript exporter (``torch.onnx.export(dynamo=False)``) at opset 17.
- Both exporters give a correct dynamic graph for this ViT (its positional embedding is always
  resized to an explicit ``size`` while exporting), checked in onnxruntime at several sizes, square
  and not, batch 1 and >1 (max abs diff ~3e-6 either way).
- Its graphs ran 10-15% faster in onnxruntime than the dynamo exporter's (measured when choosing),
  and it exports in a fraction of a second instead of ~5 s, which keeps every export and test quick.
- Opset 17 is the first with a single ``LayerNormalization`` node, which onnxruntime runs as one
  fused kernel; nothing here needs a newer op.
It is deprecated upstream but still shipped in torch 2.14; if it goes away, ``dynamo=True`` with
``dynamic_shapes`` is the drop-in replacement (the parity checks at every export would catch a
wrong graph either way).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from artifact import INPUT_NAME, LAYER_TOKENS, RESNET_OUTPUTS, VIT_OUTPUTS
from training.pooling import check_pooling, pool

log = logging.getLogger(__name__)

OPSET = 17
EXPORTER = f"torch.onnx TorchScript exporter (dynamo=False), opset {OPSET}"
# protobuf cannot hold a single file over 2 GiB; ViT-B (the largest backbone here) is ~350 MB.
MAX_PROTO_BYTES = 2**31 - 1


def token_layers(backbone: nn.Module) -> tuple[int, ...] | None:
    """The blocks whose patch tokens a ViT artifact exports as ``layer_tokens``: the last 4 (or
    all, if fewer), the same default as ``FeaturePredictionLoss``, so the server's multi-layer
    ``/distance`` is the loss's feature term. None for a ResNet."""
    if backbone.family != "vit":
        return None
    depth = len(backbone.blocks)
    return tuple(range(max(0, depth - 4), depth))


class FeatureGraph(nn.Module):
    """What the artifact computes: ViT -> (embedding, patch_tokens, attention, layer_tokens);
    ResNet -> (embedding,).

    ``layer_tokens [B, L, h*w, D]`` are the patch tokens (no CLS) after each block of
    ``token_layers``, each passed through the final norm as DINO's ``get_intermediate_layers``
    does; the last of them is the last block, so its entry is ``patch_tokens`` itself. The
    earlier blocks' tokens are read by forward hooks during the single ``forward_features`` pass:
    that method stays the one definition of the other outputs.
    """

    def __init__(self, backbone: nn.Module, pooling: str = "cls") -> None:
        super().__init__()
        check_pooling(pooling, backbone.family)
        self.backbone = backbone
        self.pooling = pooling  # which vector ``embedding`` is (training.pooling)
        self.is_vit = backbone.family == "vit"
        self.token_layers = token_layers(backbone) or ()
        assert not self.is_vit or self.token_layers[-1] == len(backbone.blocks) - 1

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        if not self.is_vit:
            return (self.backbone(pixel_values),)
        seen: list[Tensor] = []
        hooks = [
            self.backbone.blocks[i].register_forward_hook(
                lambda _m, _args, out: seen.append(out[0])  # a block returns (tokens, attention)
            )
            for i in self.token_layers[:-1]
        ]
        try:
            embedding, patches, attention = self.backbone.forward_features(pixel_values)
        finally:
            for hook in hooks:
                hook.remove()
        # Reusing ``patches`` rather than norming the last block again keeps one tensor per
        # output: OpenVINO merges equal computations and would then report ``patch_tokens``
        # under an internal name.
        norm = self.backbone.norm
        prefix = getattr(self.backbone, "n_prefix_tokens", 1)  # CLS and any register tokens
        layers = torch.stack([norm(t)[:, prefix:] for t in seen] + [patches], dim=1)
        return pool(embedding, patches, self.pooling), patches, attention, layers


def output_names(backbone: nn.Module) -> tuple[str, ...]:
    return VIT_OUTPUTS if backbone.family == "vit" else RESNET_OUTPUTS


def inference_copy(backbone: nn.Module) -> nn.Module:
    """A float32 CPU copy in eval mode, so the caller's (possibly training, GPU, bf16) module
    is left exactly as it was."""
    return copy.deepcopy(backbone).float().cpu().eval()


def dynamic_axes(names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, "embedding": {0: "batch"}}
    if "patch_tokens" in names:
        axes["patch_tokens"] = {0: "batch", 1: "patches"}
        axes["attention"] = {0: "batch", 2: "patches"}
    if LAYER_TOKENS in names:
        axes[LAYER_TOKENS] = {0: "batch", 2: "patches"}
    return axes


def trace_to_onnx(
    module: nn.Module,
    sample: Tensor,
    path: Path,
    input_name: str,
    outputs: tuple[str, ...],
    axes: dict[str, dict[int, str]],
) -> None:
    """The TorchScript exporter (``dynamo=False``) at ``OPSET``, one self-contained file, with
    the dynamic ``axes`` named; shared by the backbone and the decoder exports."""
    with warnings.catch_warnings(), torch.no_grad():
        # Deprecation of this exporter, and tracer notes about Python ints that are constants by
        # design (the trained grid size): both expected.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (sample,),
            str(path),
            dynamo=False,
            external_data=False,
            opset_version=OPSET,
            input_names=[input_name],
            output_names=list(outputs),
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def export_onnx(backbone: nn.Module, path: Path, image_size: int, pooling: str = "cls") -> None:
    """Write ``backbone`` (a CPU float32 eval copy, see ``inference_copy``) to ``path``.

    Traced at batch 2 so no batch-1 shortcut is baked in; B, H and W stay dynamic.
    """
    n_params = sum(p.numel() for p in backbone.parameters())
    if n_params * 4 > MAX_PROTO_BYTES:
        raise ValueError(
            f"{n_params:,} float32 parameters do not fit in one 2 GiB ONNX file; "
            "this exporter writes self-contained files only"
        )
    names = output_names(backbone)
    sample = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    graph = FeatureGraph(backbone, pooling)
    trace_to_onnx(graph, sample, path, INPUT_NAME, names, dynamic_axes(names))
    log.debug("wrote %s (%d bytes)", path, path.stat().st_size)
