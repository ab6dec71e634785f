"""Weighted k-NN (DINO protocol) on hand-checkable cases, and feature extraction."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
