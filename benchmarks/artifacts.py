"""The models the suite measures: seeded random-weight DINO ViTs exported once with the project's
own exporter (fp32, dynamic int8 and, where OpenVINO and NNCF are installed, OpenVINO static int8)
into a cache folder, and rebuilt in PyTorch with the same seed for the eager baseline. No weights
are downloaded (random weights: the figures are about speed and numerical agreement, not about
what a trained model has learnt)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SEED = 0
OV_INT8 = "int8_openvino"  # the manifest variant key of OpenVINO's static int8 IR


@dataclass(frozen=True)
class ModelSpec:
    key: str  # folder / model name, e.g. "vit_small-16-224"
    arch: str
    patch_size: int
    image_size: int
    depth: int | None = None  # None: the arch's own depth
    calibration: int = 300  # images that calibrate OpenVINO's static int8 (the export default)

    @property
    def label(self) -> str:
        depth = f", depth {self.depth}" if self.depth else ""
        return f"{self.arch}/{self.patch_size} @{self.image_size}{depth}"

    def backbone_kwargs(self) -> dict:
        kw: dict = {"patch_size": self.patch_size, "img_size": self.image_size}
        if self.depth:
            kw["depth"] = self.depth
        return kw


def spec_for(arch: str, smoke: bool) -> ModelSpec:
    if smoke:  # the tests' tiny model: seconds to export, milliseconds to run
        return ModelSpec(f"{arch}-8-32-d2", arch, 8, 32, depth=2, calibration=16)
    return ModelSpec(f"{arch}-16-224", arch, 16, 224)


def build_torch(spec: ModelSpec):
    """The PyTorch backbone (eval mode) with the same weights as the exported artifact."""
    import torch

    from training.backbones import build_backbone

    torch.manual_seed(SEED)
    return build_backbone(spec.arch, **spec.backbone_kwargs()).eval()


def openvino_int8_possible() -> bool:
    """Whether this environment can export (NNCF) and run (OpenVINO) the static int8 IR."""
    from benchmarks.common import has_module

    return has_module("openvino") and has_module("nncf")


def _complete(folder: Path, ov_int8: bool) -> bool:
    """An export is there with every variant this environment can measure (a folder exported
    before OpenVINO int8 was measured, or without NNCF, is exported again)."""
    from artifact import MANIFEST_NAME, load_manifest

    if not (folder / MANIFEST_NAME).is_file():
        return False
    return not ov_int8 or OV_INT8 in load_manifest(folder).variants


def model_dir(spec: ModelSpec, cache: Path) -> Path:
    """``cache/models/<key>/<key>`` (a store holding one model, so a server can serve it),
    exported on first use."""
    store = cache / "models" / spec.key
    folder = store / spec.key
    ov_int8 = openvino_int8_possible()
    if _complete(folder, ov_int8):
        return folder
    from training.augment import IMAGENET_MEAN, IMAGENET_STD
    from training.export import export_backbone, knn_eval_sizes

    log.info("exporting %s to %s (once; cached)", spec.label, folder)
    resize, crop = knn_eval_sizes(spec.image_size)
    return export_backbone(
        build_torch(spec),
        spec.key,
        store,
        arch=spec.arch,
        train_image_size=spec.image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        eval_resize=resize,
        eval_crop=crop,
        provenance={"source": "random"},
        int8=True,
        int8_openvino=ov_int8,
        int8_calibration=spec.calibration,
        # Keep the int8 files whatever their accuracy: measuring that is our job (the server
        # still refuses one that fails its gate).
        int8_min_cosine=-1.0,
    )


def flops_per_image(spec: ModelSpec, embed_dim: int, depth: int) -> float:
    """Multiply-adds x 2 of a ViT forward: patch embedding, then per block qkv + projection
    (4 N D^2), MLP (8 N D^2) and attention scores and mixing (2 N^2 D)."""
    patches = (spec.image_size // spec.patch_size) ** 2
    n, d = patches + 1, embed_dim
    macs = patches * 3 * spec.patch_size**2 * d + depth * (12 * n * d * d + 2 * n * n * d)
    return 2.0 * macs
