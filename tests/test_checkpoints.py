"""Checkpoint I/O and strict backbone loading from every supported layout."""

from __future__ import annotations

import argparse
import hashlib
import random

import numpy as np
import pytest
import torch

from artifact import sha256_file
from training.augment import _ToMode
from training.backbones import build_backbone
from training.checkpoints import (
    CheckpointError,
    extract_backbone_state_dict,
    load_backbone_weights,
    read_checkpoint,
    save_atomic,
)
from training.head import DINOHead, MultiCropWrapper


def tiny_vit(seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone("vit_tiny", patch_size=16, depth=2, img_size=32, **kw)


def official_full_checkpoint(seed: int) -> dict:
    """The layout of DINO's checkpoint.pth: DDP-wrapped student, plain teacher (ViT), args."""
    student = MultiCropWrapper(tiny_vit(seed), DINOHead(192, 16, hidden_dim=8, bottleneck_dim=4))
    teacher = MultiCropWrapper(
        tiny_vit(seed + 1), DINOHead(192, 16, hidden_dim=8, bottleneck_dim=4)
    )
    return {
        "student": {f"module.{k}": v for k, v in student.state_dict().items()},
        "teacher": teacher.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
        "dino_loss": {"center": torch.zeros(1, 16)},
    }


def assert_same_weights(model: torch.nn.Module, expected: dict) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_official_full_checkpoint_loads_strictly(tmp_path):
    ckpt = official_full_checkpoint(0)
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)  # plain torch.save, as the official code does
    assert "module.backbone.cls_token" in ckpt["student"] and "head.mlp.0.weight" in ckpt["teacher"]

    teacher_bb = {k[len("backbone.") :]: v for k, v in ckpt["teacher"].items() if "backbone." in k}
    model = tiny_vit(9)
    load_backbone_weights(model, path)  # teacher by default
    assert_same_weights(model, teacher_bb)

    student_bb = {
        k[len("module.backbone.") :]: v for k, v in ckpt["student"].items() if ".backbone." in k
    }
    load_backbone_weights(model, ckpt, which="student")
    assert_same_weights(model, student_bb)
    # Loaded weights change the output: they were really used.
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(x), tiny_vit(9)(x))


def test_backbone_only_and_wrapped_state_dicts(tmp_path):
    sd = tiny_vit(3).state_dict()  # the layout of dino_deitsmall16_pretrain.pth
    torch.save(sd, tmp_path / "pretrain.pth")
    wrapped = {"model": {f"module.{k}": v for k, v in sd.items()}}
    sources = [tmp_path / "pretrain.pth", str(tmp_path / "pretrain.pth"), sd, {"state_dict": sd}]
    for source in [*sources, wrapped]:
        model = tiny_vit(4)
        load_backbone_weights(model, source)
        assert_same_weights(model, sd)


def test_project_checkpoint_with_rng_states_and_config(tmp_path):
    student = MultiCropWrapper(tiny_vit(5), DINOHead(192, 16, hidden_dim=8, bottleneck_dim=4))
    teacher = MultiCropWrapper(tiny_vit(6), DINOHead(192, 16, hidden_dim=8, bottleneck_dim=4))
    ckpt = {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": torch.optim.AdamW(student.parameters()).state_dict(),
        "epoch": 3,
        "config": {"arch": "vit_tiny", "lr": 5e-4},
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },  # fmt: skip
    }
    path = tmp_path / "ckpt" / "last.pth"
    save_atomic(ckpt, path)
    back = read_checkpoint(path)
    assert back["epoch"] == 3 and back["config"]["lr"] == 5e-4
    assert np.array_equal(back["rng"]["numpy"][1], np.random.get_state()[1])
    sd = extract_backbone_state_dict(back)
    assert "head.mlp.0.weight" not in sd and "cls_token" in sd
    model = tiny_vit(7)
    load_backbone_weights(model, path)
    assert_same_weights(model, teacher.backbone.state_dict())


def test_wrong_arch_raises_naming_keys(tmp_path):
    ckpt = official_full_checkpoint(0)  # vit_tiny, depth 2
    small = build_backbone("vit_small", patch_size=8, depth=3, img_size=32)
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(small, ckpt)
    msg = str(err.value)
    assert "missing keys (12): [blocks.2." in msg  # depth 3 vs 2: block 2 is missing
    assert (
        "shape mismatches" in msg
        and "cls_token: checkpoint (1, 1, 192) vs model (1, 1, 384)" in msg
    )
    assert "pass --arch vit_tiny --patch-size 16" in msg and "depth 2" in msg
    before = {k: v.clone() for k, v in small.state_dict().items()}
    assert_same_weights(small, before)  # nothing was partially loaded

    resnet = build_backbone("resnet18")
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(resnet, ckpt)
    msg = str(err.value)
    assert "missing keys" in msg and "conv1.weight" in msg
    assert (
        "unexpected keys (30)" in msg and "blocks.0.attn.qkv.weight" in msg and "... and" in msg
    )  # trimmed list
    assert len(msg) < 3000

    with pytest.raises(CheckpointError, match="no 'student' entry"):
        extract_backbone_state_dict({"teacher": ckpt["teacher"]}, which="student")
    with pytest.raises(CheckpointError, match="not tensors"):
        extract_backbone_state_dict({"epoch": 3, "lr": 0.1})


def test_corrupt_and_missing_files(tmp_path):
    path = tmp_path / "good.pth"
    torch.save(official_full_checkpoint(0), path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match=f"{bad.name} is corrupt or truncated"):
            read_checkpoint(bad)
        with pytest.raises(CheckpointError, match=bad.name):
            load_backbone_weights(tiny_vit(0), bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")


def test_arbitrary_objects_need_trust(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"w": torch.zeros(1), "obj": hashlib.sha256}, path)  # a non-allowlisted global
    with pytest.raises(CheckpointError, match="openssl_sha256.*--trust-source"):
        read_checkpoint(path)
    assert read_checkpoint(path, trusted=True)["obj"] is hashlib.sha256


def test_save_atomic_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_atomic({"epoch": 1}, path)
    save_atomic({"epoch": 2}, path)
    assert read_checkpoint(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_atomic({"bad": Unpicklable()}, path)
    assert read_checkpoint(path)["epoch"] == 2  # the previous file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_project_classes_need_trust(tmp_path):
    # A class of this project's own package is code too: refused unless explicitly trusted.
    path = tmp_path / "cfg.pth"
    torch.save({"w": torch.zeros(1), "tf": _ToMode("L")}, path)
    with pytest.raises(CheckpointError, match="training.augment._ToMode"):
        read_checkpoint(path)
    assert read_checkpoint(path, trusted=True)["tf"].mode == "L"
