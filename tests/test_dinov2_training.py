"""Training a DINOv2-architecture model: the ``dinov2`` preset's recipe on Fashion-MNIST images
resumes bit-exactly, its checkpoints hold the official key names, and it exports."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from family_reference import official_keys, trim

from training.backbones import build_backbone
from training.checkpoints import CheckpointError, load_backbone_weights, read_checkpoint
from training.config import preset
from training.data import ArrayDataset, DatasetError, load_fashion_mnist
from training.run import export_teacher
from training.run import run as run_training
from training.trainer import Trainer

TINY = dict(
    vit_depth=1,
    global_size=28,
    local_size=14,
    eval_resize=28,
    eval_crop=28,
    n_local_crops=1,
    batch_size=8,
    epochs=2,
    warmup_epochs=1,
    out_dim=64,
    head_hidden_dim=64,
    head_bottleneck_dim=32,
    time_budget_min=None,
    precision="fp32",
    log_every=1,
)


@pytest.fixture(scope="module")
def fashion():
    try:
        train, _ = load_fashion_mnist()
    except DatasetError as exc:
        pytest.skip(f"Fashion-MNIST is not installed here: {exc}")
    return ArrayDataset(train.images[:32], train.labels[:32])


def test_preset_uses_the_dinov2_recipe_pieces():
    cfg = preset("dinov2")
    assert cfg.arch == "dinov2_vits14_reg" and cfg.patch_size == 14
    assert cfg.mim_weight > 0 and cfg.koleo_weight > 0 and cfg.teacher_centering == "sinkhorn"
    with pytest.raises(ValueError, match="patch size 14"):
        preset("dinov2", patch_size=16)
    # A hub name alone picks its own patch size in any preset.
    assert (
        preset(
            "quickstart",
            arch="dinov3_vits16",
            global_size=32,
            local_size=16,
            eval_resize=32,
            eval_crop=32,
        ).patch_size
        == 16
    )


def test_dinov2_run_resumes_bit_exactly_and_exports(fashion, tmp_path):
    cfg = preset("dinov2", **TINY)
    full = Trainer(cfg, fashion, tmp_path / "full", show_progress=False)
    full.fit()
    cut = Trainer(cfg, fashion, tmp_path / "cut", show_progress=False)
    cut.fit(stop_after_epochs=1)
    resumed = Trainer(cfg, fashion, tmp_path / "cut", show_progress=False)
    resumed.load_checkpoint()
    resumed.fit()
    steps = [r for r in full.history if r["kind"] == "step" and r["iteration"] >= 4]
    again = [r for r in resumed.history if r["kind"] == "step"]
    assert [r["iteration"] for r in again] == [r["iteration"] for r in steps] and again
    for a, b in zip(steps, again, strict=True):
        assert a["loss"] == b["loss"]
    for (k, a), b in zip(
        full.teacher.state_dict().items(), resumed.teacher.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k

    # The checkpoint's teacher loads strictly into the official DINOv2 layout (names, shapes).
    ckpt = read_checkpoint(full.checkpoint_path)
    model = build_backbone("dinov2_vits14_reg", depth=1, img_size=28)
    load_backbone_weights(model, ckpt, which="teacher")
    sd = model.state_dict()
    official = dict(official_keys("dinov2_vits14_reg"))
    for key in trim(list(sd)):
        assert key in official, key
        if key != "pos_embed":  # the trained 2 x 2 grid instead of 37 x 37
            assert list(sd[key].shape) == official[key], key
    assert not torch.equal(sd["mask_token"], torch.zeros_like(sd["mask_token"]))  # iBOT used it
    with pytest.raises(CheckpointError, match="register_tokens"):
        load_backbone_weights(build_backbone("dinov2_vits14", depth=1, img_size=28), ckpt)

    cfg.models_dir = str(tmp_path / "models")
    path = export_teacher(full, cfg, None, "dinov2-tiny")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["arch"] == "dinov2_vits14_reg" and manifest["n_register_tokens"] == 4
    assert manifest["lineage"] == "dinov2" and manifest["patch_size"] == 14


def write_idx(path, array) -> None:
    """An IDX file as the Fashion-MNIST distribution ships it (gzipped, unsigned bytes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_run_cli_trains_a_hub_name_with_the_quickstart_recipe(fashion, tmp_path):
    root = tmp_path / "fmnist"
    root.mkdir()
    images, labels = fashion.images, np.asarray(fashion.labels)
    for split, sl in (("train", slice(0, 24)), ("t10k", slice(24, 32))):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images[sl])
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels[sl])
    flags = {
        "--arch": "dinov2_vits14_reg",
        "--fmnist-dir": root,
        "--out": tmp_path / "run",
        "--models-dir": tmp_path / "models",
        "--export-name": "cli",
        "--vit-depth": 1,
        "--batch-size": 8,
        "--epochs": 1,
        "--out-dim": 64,
        "--head-hidden-dim": 64,
        "--head-bottleneck-dim": 32,
        "--n-local-crops": 1,
        "--time-budget-min": "none",
        "--precision": "fp32",
    }
    summary = run_training([str(x) for pair in flags.items() for x in pair])
    manifest = json.loads((tmp_path / "models" / "cli" / "manifest.json").read_text())
    assert manifest["arch"] == "dinov2_vits14_reg" and manifest["patch_size"] == 14
    assert summary["knn"] is not None
