"""iBOT's masked patch loss: masks, the masked ViT input, the patch loss and a training step."""

from __future__ import annotations

import math

import pytest
import torch
from test_trainer import _trainer, tiny_config

from training.backbones import build_backbone
from training.checkpoints import extract_backbone_state_dict, load_backbone_weights
from training.masked_patches import PatchDistillLoss, draw_patch_masks
from training.state import Plan


def _masks(n=2000, patches=16, ratio=(0.1, 0.5), prob=0.5, seed=0):
    return draw_patch_masks(n, patches, ratio, prob, torch.Generator().manual_seed(seed))


def test_masks_hide_the_asked_share_of_the_asked_images():
    masks = _masks()
    assert masks.shape == (2000, 16) and masks.dtype == torch.bool
    hidden = masks.sum(dim=1)
    masked = hidden > 0
    assert 0.45 < masked.float().mean() < 0.55  # prob 0.5
    # 10-50 % of 16 patches, rounded: 2 to 8, never all of an image.
    assert hidden[masked].min() >= 2 and hidden[masked].max() <= 8
    assert 3.5 < hidden[masked].float().mean() < 5.1  # mean fraction 0.3 -> 4.8 patches
    # Which patches: every position is hidden about equally often.
    per_position = masks.float().sum(dim=0) / masks.sum()
    assert per_position.max() < 2 / 16
    assert torch.equal(masks, _masks())  # one generator seed, one draw (exact resume)
    assert not torch.equal(masks, _masks(seed=1))


def test_masks_always_hide_something_and_refuse_bad_settings():
    few = _masks(n=4, prob=1e-9)
    assert few.sum() >= 2  # the head's BatchNorm needs at least two rows
    with pytest.raises(ValueError, match="0 < lo <= hi < 1"):
        _masks(ratio=(0.5, 1.0))
    with pytest.raises(ValueError, match="0 < prob"):
        _masks(prob=0.0)


def test_a_hidden_patch_no_longer_reaches_the_output():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=4, img_size=16, depth=2).eval()
    token = torch.randn(vit.embed_dim)
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 5] = True  # image 0, patch row 1 col 1 = pixels 4:8, 4:8
    changed = x.clone()
    changed[0, :, 4:8, 4:8] = 7.0
    with torch.no_grad():
        a = vit.forward_tokens(x, mask, token)
        b = vit.forward_tokens(changed, mask, token)
        seen = vit.forward_tokens(changed)
        torch.testing.assert_close(a, b)  # the hidden pixels do not matter
        assert not torch.allclose(seen[0], a[0])  # without the mask they do
        # No mask: the CLS is what forward() serves; the mask token is not in the backbone.
        torch.testing.assert_close(vit.forward_tokens(x)[:, 0], vit(x))
    assert not any("mask" in k for k in vit.state_dict())
    with pytest.raises(ValueError, match="mask_token"):
        vit.forward_tokens(x, mask)


def test_patch_loss_on_a_hand_checkable_case():
    loss = PatchDistillLoss(4, student_temp=0.1, center_momentum=0.9)
    teacher = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    # A flat student against any teacher: the cross-entropy is ln K.
    value = loss(torch.zeros(2, 4), teacher, teacher_temp=0.05)
    assert value.item() == pytest.approx(math.log(4), abs=1e-6)
    torch.testing.assert_close(loss.center, 0.1 * teacher.mean(0, keepdim=True))
    # A student that agrees with sharp targets pays almost nothing; the teacher is centred.
    loss.center.zero_()
    student = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0]])
    assert loss(student, teacher, teacher_temp=0.01).item() < 1e-3
    assert loss.last_teacher_entropy < 1e-3
    with pytest.raises(ValueError, match="same"):
        loss(torch.zeros(3, 4), teacher, 0.05)


def test_a_step_adds_the_weighted_patch_loss_and_trains_the_mask_token(tmp_path):
    cfg = tiny_config(mim_weight=0.5, seed=3)
    tr = _trainer(tmp_path, cfg)
    tr.build_schedules(Plan(len(tr.loader), len(tr.loader), cfg.epochs))
    batch = next(iter(tr.loader))[0]
    torch.manual_seed(0)
    crops = tr._crops(batch)
    masks = tr._patch_masks()
    assert masks.shape == (2 * tr.batch_per_rank, 16) and masks.any()
    with torch.no_grad():
        out, _, s_patch = tr.student(crops, patch_positions=masks, mask_patches=True)
        t_out, _, t_patch = tr.teacher(crops[:2], patch_positions=masks)
        assert s_patch.shape == t_patch.shape == (int(masks.sum()), cfg.out_dim)
        dino = tr.loss(out, t_out, 0).item()
        mim = tr.patch_loss(s_patch, t_patch, tr.loss.teacher_temp_at(0)).item()
    tr.loss.center.zero_()  # the probe above moved the centres; start the step from 0 again
    tr.patch_loss.center.zero_()
    torch.manual_seed(0)
    assert tr._step(batch) == pytest.approx(dino + 0.5 * mim, abs=1e-5)
    grad = tr.student_plain.mask_token.grad  # (the warm-up's lr is 0 at this first step)
    assert grad is not None and grad.abs().sum() > 0  # the mask token learns


def test_resume_with_the_patch_loss_takes_the_same_next_step(tmp_path):
    cfg = tiny_config(epochs=2, mim_weight=1.0, batch_augment=True)
    full = _trainer(tmp_path / "full", cfg)
    full.fit()
    _trainer(tmp_path / "cut", cfg).fit(stop_after_epochs=1)
    resumed = _trainer(tmp_path / "cut", cfg)
    resumed.load_checkpoint()
    resumed.fit()
    after = [r["loss"] for r in full.history if r["kind"] == "step" and r["iteration"] >= 4]
    assert after == [r["loss"] for r in resumed.history if r["kind"] == "step"]
    torch.testing.assert_close(full.patch_loss.center, resumed.patch_loss.center, rtol=0, atol=0)
    # The served backbone loads strictly from this checkpoint; the mask token stays behind.
    state = torch.load(resumed.checkpoint_path, weights_only=False)
    assert "mask_token" in state["teacher"]
    backbone = build_backbone("vit_tiny", patch_size=4, img_size=16, depth=1)
    load_backbone_weights(backbone, extract_backbone_state_dict(state))


def test_the_patch_loss_needs_a_vit():
    with pytest.raises(ValueError, match="needs a ViT"):
        tiny_config(arch="resnet18", mim_weight=1.0).validate()
    with pytest.raises(ValueError, match="--mim-ratio"):
        tiny_config(mim_weight=1.0, mim_ratio=(0.0, 0.5)).validate()
