"""Shared fixtures: tiny real models exported once per session, for export and service tests.

torch is imported inside the fixtures only, so test modules that never ask for them (the
torch-free service tests) do not pay for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pg_fixture import pg_server, pg_url  # noqa: F401 (fixtures: a real PostgreSQL + pgvector)

# The served default (DINO_ENGINE=auto) is OpenVINO bf16 where it is installed and the CPU has
# bf16; the service tests compare against onnxruntime fp32 to 1e-5, so they pin the reference
# engine. tests/test_engines.py covers OpenVINO and `auto`, tests/test_quickstart.py the default.
os.environ["DINO_ENGINE"] = "onnxruntime"

TINY_VIT = {"arch": "vit_tiny", "patch_size": 8, "depth": 2, "img_size": 32}
TINY_RESNET = {"arch": "resnet18", "image_size": 64}


def _export(backbone, name: str, models_dir: Path, arch: str, size: int, int8: bool) -> Path:
    from training.augment import IMAGENET_MEAN, IMAGENET_STD
    from training.export import export_backbone, knn_eval_sizes

    resize, crop = knn_eval_sizes(size)
    return export_backbone(
        backbone,
        name,
        models_dir,
        arch=arch,
        train_image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        eval_resize=resize,
        eval_crop=crop,
        provenance={"source": "random"},
        int8=int8,
    )


@pytest.fixture(scope="session")
def tiny_vit():
    """A random ViT-Tiny, depth 2, patch 8, trained size 32 (seed 0), in eval mode."""
    import torch

    from training.backbones import build_backbone

    torch.manual_seed(0)
    kw = {k: v for k, v in TINY_VIT.items() if k != "arch"}
    return build_backbone(TINY_VIT["arch"], **kw).eval()


@pytest.fixture(scope="session")
def tiny_resnet():
    """A random torchvision ResNet-18 backbone (seed 0), in eval mode."""
    import torch

    from training.backbones import build_backbone

    torch.manual_seed(0)
    return build_backbone(TINY_RESNET["arch"]).eval()


@pytest.fixture(scope="session")
def tiny_vit_dir(tiny_vit, tmp_path_factory) -> Path:
    """``<store>/tiny-vit``: the tiny ViT exported with an int8 variant; the store holds only it.

    Outputs embedding [B,192], patch_tokens [B,h*w,192], attention [B,3,h*w], layer_tokens
    [B,2,h*w,192] (token_layers 0 and 1); eval transform resize 37, crop 32.
    """
    store = tmp_path_factory.mktemp("vit-models")
    return _export(tiny_vit, "tiny-vit", store, "vit_tiny", TINY_VIT["img_size"], int8=True)


@pytest.fixture(scope="session")
def tiny_resnet_dir(tiny_resnet, tmp_path_factory) -> Path:
    """``<store>/tiny-resnet``: ResNet-18 (embedding [B,512] only, no attention), trained size
    64, eval resize 73 / crop 64; the store holds only it."""
    store = tmp_path_factory.mktemp("resnet-models")
    size = TINY_RESNET["image_size"]
    return _export(tiny_resnet, "tiny-resnet", store, "resnet18", size, int8=False)
