"""DINOLoss on cases small enough to check by hand or with a few lines of numpy."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.loss import DINOLoss, sinkhorn_knopp
from training.masked_patches import PatchDistillLoss


def make_loss(k: int = 3, ncrops: int = 3, **kw) -> DINOLoss:
    args = dict(
        warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0, nepochs=5
    )
    return DINOLoss(k, ncrops, **{**args, **kw})


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_dino_loss(s, t, center, ncrops, t_temp, s_temp=0.1, skip_same=True):
    """Straightforward reference: mean over (teacher view, student view) pairs of mean-over-batch
    cross-entropy."""
    b = t.shape[0] // 2
    q = np_softmax((t - center) / t_temp)
    logp = np.log(np_softmax(s / s_temp))
    terms = []
    for iq in range(2):
        for v in range(ncrops):
            if skip_same and v == iq:
                continue
            qi, lv = q[iq * b : (iq + 1) * b], logp[v * b : (v + 1) * b]
            terms.append((-(qi * lv).sum(-1)).mean())
    return float(np.mean(terms))


def test_hand_checkable_values():
    loss = make_loss()
    # Uniform student: every log-probability is -ln 3, whatever the teacher says.
    t = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]])
    assert loss(torch.zeros(3, 3), t, epoch=0).item() == pytest.approx(math.log(3), abs=1e-6)
    # One-hot teacher on class 2 (logit gap / 0.04 = 250) and student logits / 0.1 = [0, 0, ln 2]:
    # student probabilities [1/4, 1/4, 1/2], so every pair costs -ln(1/2) = ln 2.
    loss = make_loss()
    t = torch.tensor([[0.0, 0.0, 10.0], [0.0, 0.0, 10.0]])
    s = torch.tensor([[0.0, 0.0, 0.1 * math.log(2)]] * 3)
    assert loss(s, t, epoch=0).item() == pytest.approx(math.log(2), abs=1e-6)


def test_matches_numpy_reference_with_batch_and_center():
    rng = np.random.default_rng(0)
    b, k, ncrops = 4, 5, 4
    s, t = rng.normal(size=(ncrops * b, k)), rng.normal(size=(2 * b, k))
    center = rng.normal(size=(1, k)) * 0.5
    loss = make_loss(k, ncrops, teacher_temp=0.07)
    loss.center.copy_(torch.tensor(center, dtype=torch.float32))
    got = loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), 0)
    assert got.item() == pytest.approx(np_dino_loss(s, t, center, ncrops, 0.07), rel=1e-5)


def test_same_view_pairs_are_skipped():
    # Student view 0 agrees with teacher view 0 and view 1 with teacher view 1 (confidently),
    # while the views disagree with each other: including same-view pairs would lower the loss.
    loss = make_loss(ncrops=2)
    t = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    got = loss(s, t, epoch=0).item()
    expected = np_dino_loss(s.numpy(), t.numpy(), 0.0, 2, 0.04)
    with_same = np_dino_loss(s.numpy(), t.numpy(), 0.0, 2, 0.04, skip_same=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got == pytest.approx(10 + math.log(1 + 2 * math.exp(-10)), rel=1e-5)  # by hand
    assert abs(with_same - got) > 4.0


def test_centering_and_sharpening():
    t = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.1, 0.0]])  # dimension 0 dominates every sample
    s = torch.zeros(3, 3)
    sharp, soft = make_loss(teacher_temp=0.04), make_loss(teacher_temp=0.5)
    sharp(s, t, 0)
    soft(s, t, 0)
    # Sharpening: lower temperature, lower entropy; both below the uniform ln K.
    assert sharp.last_teacher_entropy < soft.last_teacher_entropy < math.log(3)
    q = np_softmax(t.numpy() / 0.5)
    assert soft.last_teacher_entropy == pytest.approx(
        float(-(q * np.log(q)).sum(-1).mean()), rel=1e-5
    )
    # Centring: with the center at the teacher mean, the dominant dimension no longer wins and the
    # teacher distribution moves towards uniform.
    centred = make_loss(teacher_temp=0.5)
    centred.center.copy_(t.mean(0, keepdim=True))
    centred(s, t, 0)
    assert centred.last_teacher_entropy > soft.last_teacher_entropy + 0.5


def test_center_ema_update_value():
    loss = make_loss(center_momentum=0.9)
    t1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    loss(torch.zeros(3, 3), t1, 0)
    torch.testing.assert_close(loss.center, torch.tensor([[0.2, 0.2, 0.2]]))
    t2 = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss(torch.zeros(3, 3), t2, 0)
    torch.testing.assert_close(loss.center, torch.tensor([[0.9 * 0.2 + 0.1 * 2.0, 0.18, 0.18]]))
    assert not loss.center.requires_grad
    assert "center" in loss.state_dict()  # saved with checkpoints


def test_gradient_flows_to_student_only():
    loss = make_loss()
    s = torch.randn(3, 3, requires_grad=True)
    t = torch.randn(2, 3, requires_grad=True)
    loss(s, t, 0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_teacher_temperature_warmup_endpoints():
    loss = make_loss(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
                     nepochs=100)  # fmt: skip
    assert loss.teacher_temp_at(0) == pytest.approx(0.04)
    assert loss.teacher_temp_at(15) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert loss.teacher_temp_at(29) == pytest.approx(0.07)
    assert loss.teacher_temp_at(99) == pytest.approx(0.07)
    assert loss.teacher_temp_at(150) == pytest.approx(0.07)  # resumed past the schedule
    # The epoch's temperature is the one the forward uses.
    t, s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.randn(3, 3)
    loss(s, t, 0)
    q = np_softmax(t.numpy() / 0.04)
    assert loss.last_teacher_entropy == pytest.approx(
        float(-(q * np.log(q)).sum(-1).mean()), rel=1e-4
    )


def test_bad_shapes_and_arguments():
    loss = make_loss(ncrops=3)
    with pytest.raises(ValueError, match="expected ncrops"):
        loss(torch.zeros(8, 3), torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="out_dim=3"):
        loss(torch.zeros(6, 4), torch.zeros(2, 4), 0)
    with pytest.raises(ValueError, match="2 global crops"):
        loss(torch.zeros(3, 3), torch.zeros(3, 3), 0)
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        make_loss(warmup_teacher_temp_epochs=10, nepochs=5)
    with pytest.raises(ValueError, match="ncrops"):
        make_loss(ncrops=1)


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loss = make_loss()
        t = torch.full((2, 3), float(rank + 1)) * torch.tensor([1.0, 2.0, 3.0])
        loss(torch.zeros(3, 3), t, 0)
        # Sinkhorn-Knopp over the two processes' rows together: each sees half of one batch.
        half = _sinkhorn_batch().chunk(world)[rank]
        # iBOT's patch centre: rank 0 hides 1 patch, rank 1 hides 3 (means weighted by count).
        patch_loss = PatchDistillLoss(3)
        rows = 1 + 2 * rank
        patch_loss(torch.zeros(rows, 3), t[:1].expand(rows, 3), 0.1)
        sk = sinkhorn_knopp(half, temp=0.1).tolist()
        queue.put((rank, (loss.center.tolist(), sk, patch_loss.center.tolist())))
    finally:
        dist.destroy_process_group()


def test_centres_and_sinkhorn_are_reduced_across_processes():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, queue), nprocs=2, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    # Rank 0 sees mean [1, 2, 3], rank 1 [2, 4, 6]; the global mean is [1.5, 3, 4.5].
    for rank in (0, 1):
        np.testing.assert_allclose(results[rank][0], [[0.15, 0.3, 0.45]], rtol=1e-6)
    # The Sinkhorn-Knopp targets equal those of one process holding the whole batch.
    whole = sinkhorn_knopp(_sinkhorn_batch(), temp=0.1).numpy()
    np.testing.assert_allclose(results[0][1] + results[1][1], whole, rtol=1e-4, atol=1e-6)
    # Patch centre: (1 x [1, 2, 3] + 3 x [2, 4, 6]) / 4 rows = [1.75, 3.5, 5.25], times 0.1.
    for rank in (0, 1):
        np.testing.assert_allclose(results[rank][2], [[0.175, 0.35, 0.525]], rtol=1e-6)


def _sinkhorn_batch() -> torch.Tensor:
    return torch.randn(12, 5, generator=torch.Generator().manual_seed(3))


def test_sinkhorn_targets_are_distributions_that_share_prototypes_equally():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=gen)
    q = sinkhorn_knopp(logits, temp=0.5, iterations=100)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    # Converged: each of the 16 prototypes receives 64 / 16 = 4 rows' worth of mass.
    assert torch.allclose(q.sum(dim=0), torch.full((16,), 4.0), atol=1e-3)
    # Each row's target keeps its own ranking of the prototypes it prefers most.
    assert (q.argmax(dim=1) == logits.argmax(dim=1)).float().mean() > 0.5
    # The default 3 iterations at DINO's temperature already come close to the balance.
    few = sinkhorn_knopp(logits * 0.05, temp=0.04)
    assert float((few.sum(dim=0) - 4.0).abs().max()) < 0.5


def test_sinkhorn_ignores_a_per_row_shift_and_survives_cold_temperatures():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 8, generator=gen)
    shifted = logits + torch.arange(32.0).unsqueeze(1) * 20  # exp(x / 0.03) overflows unshifted
    a, b = sinkhorn_knopp(logits, temp=0.03), sinkhorn_knopp(shifted, temp=0.03)
    assert torch.isfinite(b).all()
    assert torch.allclose(a, b, atol=1e-2)


def test_sinkhorn_centering_spreads_a_teacher_stuck_on_one_prototype():
    """Every teacher row prefers prototype 0: the EMA centre (zero at the start) keeps the
    one-hot targets, so a student that also says 0 pays almost nothing; Sinkhorn-Knopp spreads
    the targets over the prototypes in the very first batch, and that student pays."""
    k, batch = 8, 16
    teacher = torch.randn(2 * batch, k, generator=torch.Generator().manual_seed(2)) * 0.1
    teacher[:, 0] += 1.0
    student = torch.zeros(4 * batch, k)
    student[:, 0] = 2.0  # at student temperature 0.1: nearly all mass on prototype 0
    ema = DINOLoss(k, 4, 0.04, 0.04, 0, 1)(student, teacher, epoch=0)
    spread = DINOLoss(k, 4, 0.04, 0.04, 0, 1, centering="sinkhorn")(student, teacher, epoch=0)
    assert float(ema) < 0.01
    assert float(spread) > 10 * float(ema) + 1.0
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(k, 4, 0.04, 0.04, 0, 1, centering="mean")


def test_sinkhorn_centering_leaves_the_ema_centre_alone():
    loss = make_loss(centering="sinkhorn")
    loss(torch.zeros(3, 3), torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), 0)
    assert torch.equal(loss.center, torch.zeros(1, 3))
