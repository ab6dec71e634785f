"""Weighted k-NN (DINO protocol) on hand-checkable cases, and feature extraction."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from training.knn import extract_features, knn_classify


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_votes_are_weighted_by_exp_similarity_over_t():
    # One close neighbour of class 1 outweighs two far ones of class 0 at T=0.07.
    train = _unit([1.0, 0.0], [0.5, 0.866], [0.49, 0.87])
    labels = torch.tensor([1, 0, 0])
    test = _unit([1.0, 0.0])
    weighted = knn_classify(train, labels, test, torch.tensor([1]), k=3, temperature=0.07)
    assert weighted["top1"] == 100.0
    # With a huge temperature every vote weighs ~1: the majority (class 0) wins.
    flat = knn_classify(train, labels, test, torch.tensor([1]), k=3, temperature=1e6)
    assert flat["top1"] == 0.0
    assert flat["top5"] == 100.0  # class 1 is still among the top 5 classes


def test_k_limits_the_neighbours():
    train = _unit([1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.9])
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = _unit([0.95, 0.05])
    # k=2: only the two class-0 neighbours vote. k=5: three class-1 votes, each far weaker.
    assert knn_classify(train, labels, test, torch.tensor([0]), k=2)["top1"] == 100.0
    sims = (train @ test.t()).squeeze()
    w0 = sum(math.exp(s / 0.07) for s in sims[:2].tolist())
    w1 = sum(math.exp(s / 0.07) for s in sims[2:].tolist())
    expected = 100.0 if w0 > w1 else 0.0
    assert knn_classify(train, labels, test, torch.tensor([0]), k=5)["top1"] == expected


def test_accuracy_over_a_batch_in_chunks():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    labels = torch.arange(4).repeat_interleave(30)
    feats = F.normalize(centres[labels] + 0.05 * torch.randn(120, 16, generator=g), dim=1)
    result = knn_classify(feats[::2], labels[::2], feats[1::2], labels[1::2], k=5, chunk=7)
    assert result["top1"] == 100.0 and result["top5"] == 100.0


class _Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 8)

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_extract_features_normalises_and_bf16_agrees():
    torch.manual_seed(0)
    data = [(torch.randn(3, 2, 2), i % 3) for i in range(10)]
    model = _Flat().train()
    feats, labels = extract_features(model, data, batch_size=4, show_progress=False)
    assert feats.shape == (10, 8) and labels.tolist() == [i % 3 for i in range(10)]
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))
    assert model.training  # mode restored
    bf16, _ = extract_features(model, data, batch_size=4, bf16=True, show_progress=False)
    assert (bf16 * feats).sum(dim=1).min() > 0.99


# ---------------------------------------------------------------- python -m training.knn

ROOT = Path(__file__).resolve().parents[1]


def _knn_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "training.knn", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _tiny_folder(root: Path) -> Path:
    """train/ and val/ with two classes of small colour images of odd sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (37, 51, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def test_an_official_vit_checkpoint_is_evaluated_as_on_imagenet(tmp_path):
    from training.augment import IMAGENET_MEAN, IMAGENET_STD
    from training.backbones import build_backbone

    torch.manual_seed(0)
    checkpoint = tmp_path / "dino_deitsmall16_pretrain.pth"  # the official format: a state dict
    torch.save(build_backbone("vit_small", 16).state_dict(), checkpoint)
    data = _tiny_folder(tmp_path / "data")
    out = tmp_path / "knn.json"
    args = ["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)]
    proc = _knn_cli(*args, "--num-workers", "0", "--precision", "fp32", "--k", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["eval"] == {
        "resize": 256,
        "crop": 224,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    assert result["n_train"] == 4 and result["n_test"] == 2


def test_bad_input_exits_2_with_one_message_and_no_traceback(tmp_path):
    missing = _knn_cli("--checkpoint", str(tmp_path / "missing.pth"))
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr and "missing.pth" in missing.stderr
    official = tmp_path / "official.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 4)}, official)
    untrained = _knn_cli("--checkpoint", str(official), "--untrained")
    assert untrained.returncode == 2 and "needs --arch" in untrained.stderr
    assert "Traceback" not in untrained.stderr
    usage = _knn_cli("--checkpoint", str(official), "--k", "many")
    assert usage.returncode == 2 and "invalid int value" in usage.stderr
