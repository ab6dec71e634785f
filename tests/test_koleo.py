"""KoLeo spreading term: hand-checked values, the direction of its gradient, crop handling."""

from __future__ import annotations

import math

import pytest
import torch

from training.koleo import koleo_loss, koleo_per_crop


def test_value_on_a_hand_checkable_case():
    # Three unit vectors: each one's nearest neighbour is at distance sqrt(2).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    # Scale does not matter (features are L2-normalised first).
    assert koleo_loss(5 * x).item() == pytest.approx(koleo_loss(x).item(), abs=1e-6)
    # Two close points and a far one: the close pair dominates.
    y = torch.tensor([[1.0, 0.0], [math.cos(0.1), math.sin(0.1)], [-1.0, 0.0]])
    d_close, d_far = 2 * math.sin(0.05), 2 * math.sin((math.pi - 0.1) / 2)
    want = -(2 * math.log(d_close) + math.log(d_far)) / 3
    assert koleo_loss(y).item() == pytest.approx(want, abs=1e-5)


def test_a_gradient_step_spreads_the_closest_pair():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    x[1] = torch.nn.functional.normalize(x[0] + 0.01 * torch.randn(8), dim=0)
    x.requires_grad_(True)
    before = torch.nn.functional.normalize(x.detach(), dim=1)
    koleo_loss(x).backward()
    with torch.no_grad():
        after = torch.nn.functional.normalize(x - 0.05 * x.grad, dim=1)
    assert (after[0] - after[1]).norm() > (before[0] - before[1]).norm()
    assert koleo_loss(after) < koleo_loss(before)


def test_per_crop_keeps_views_of_one_image_apart():
    # Crop-major rows: two crops of the same 4 images are identical, which would give
    # distance 0 (loss ~ -log(eps)) if neighbours were sought across crops.
    torch.manual_seed(0)
    one_crop = torch.randn(4, 6)
    both = torch.cat([one_crop, one_crop])
    assert koleo_per_crop(both, 2).item() == pytest.approx(2 * koleo_loss(one_crop).item())
    assert koleo_per_crop(both, 2).item() < 5.0


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(4))
