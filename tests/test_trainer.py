"""Training loop on real tiny models: EMA, schedules, resume, divergence, budget, end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from training.budget import STEP_MARGIN, export_reserve_s
from training.config import TrainConfig
from training.data import ArrayDataset
from training.koleo import koleo_per_crop
from training.precision import cpu_has_bf16, resolve_precision
from training.schedules import scaled_lr
from training.state import Plan
from training.trainer import Trainer, TrainingDiverged
from training.updates import clip_gradients, ema_update


def digits(n: int | None = None, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits as uint8 images upscaled to ``size`` (real, offline, labelled)."""
    d = load_digits()
    images = (d.images * 255 / 16).clip(0, 255).astype(np.uint8)[:n]
    up = [np.asarray(Image.fromarray(i).resize((size, size), Image.BICUBIC)) for i in images]
    return np.stack(up), d.target[:n]


def tiny_config(**kw) -> TrainConfig:
    base = dict(
        patch_size=4,
        vit_depth=1,
        global_size=16,
        local_size=8,
        n_local_crops=1,
        out_dim=64,
        head_hidden_dim=64,
        head_bottleneck_dim=32,
        batch_size=8,
        epochs=2,
        num_workers=0,
        eval_resize=16,
        eval_crop=16,
        time_budget_min=None,
        warmup_epochs=1,
        precision="fp32",
        log_every=1,
        freeze_last_layer=0.5,
        # DINO's values, which these tests check against (the defaults are the quickstart's).
        batch_augment=False,
        drop_path_rate=0.1,
        use_bn_in_head=False,
        norm_last_layer=True,
        lr=2e-3,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        momentum_teacher_end=1.0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        embedding_pooling="cls",
        embedding_whiten=None,
    )
    return TrainConfig(**{**base, **kw})


def test_precision_resolution():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")


def test_ema_update_is_m_teacher_plus_1_minus_m_student():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t_old, t_new, s in zip(before, teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * s.detach(), rtol=0, atol=1e-7)
    ema_update(teacher, student, 1.0)  # momentum 1 leaves the teacher as it is
    ema_update(teacher, student, 0.0)  # momentum 0 copies the student
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, s)


def _trainer(tmp_path, cfg: TrainConfig, n: int = 32, knn: bool = False) -> Trainer:
    images, labels = digits(n)
    data = ArrayDataset(images, labels)
    sets = (data, data) if knn else None
    return Trainer(cfg, data, tmp_path, knn_sets=sets, show_progress=False)


def test_clipping_caps_each_parameters_gradient_norm_separately():
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), 2.0)  # norm sqrt(24) ~ 4.9: scaled to 3
    model.bias.grad = torch.tensor([0.6, 0.8])  # norm 1: left alone
    clip_gradients(model, 3.0)
    assert model.weight.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(model.weight.grad, torch.full((2, 3), 2.0 * 3.0 / 24**0.5))
    torch.testing.assert_close(model.bias.grad, torch.tensor([0.6, 0.8]))
    model.bias.grad = None  # parameters without a gradient are skipped
    clip_gradients(model, 1.0)
    assert model.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_schedules_are_wired_per_iteration(tmp_path):
    cfg = tiny_config(epochs=2, warmup_epochs=1)
    tr = _trainer(tmp_path, cfg)
    tr.build_schedules(Plan(4, 4, 2))
    peak = scaled_lr(cfg.lr, cfg.batch_size)
    assert tr.schedules.lr[0] == 0.0 and tr.schedules.lr[4] == pytest.approx(peak)
    assert tr.schedules.lr[-1] == pytest.approx(cfg.min_lr)
    assert tr.schedules.weight_decay[0] == pytest.approx(0.04) and tr.schedules.weight_decay[
        -1
    ] == pytest.approx(0.4)
    assert tr.schedules.momentum[0] == pytest.approx(0.996) and tr.schedules.momentum[
        -1
    ] == pytest.approx(1.0)
    assert tr.schedules.freeze_iters == 2
    tr.cfg.momentum_teacher_end = 0.999  # a teacher that still moves at the end
    tr.build_schedules(Plan(4, 4, 2))
    assert tr.schedules.momentum[0] == pytest.approx(0.996) and tr.schedules.momentum[
        -1
    ] == pytest.approx(0.999)
    assert all(np.diff(tr.schedules.momentum) >= 0)
    with pytest.raises(ValueError, match="teacher momentum must rise"):
        tiny_config(momentum_teacher=0.99, momentum_teacher_end=0.98).validate()
    batches = iter(tr.loader)
    last = tr.student_plain.head.last_layer.weight_v.detach().clone()
    for it in range(6):
        teacher_before = [p.detach().clone() for p in tr.teacher.parameters()]
        tr._step(next(batches)[0])
        groups = tr.optimizer.param_groups
        assert groups[0]["lr"] == groups[1]["lr"] == pytest.approx(tr.schedules.lr[it])
        assert groups[0]["weight_decay"] == pytest.approx(tr.schedules.weight_decay[it])
        assert groups[1]["weight_decay"] == 0.0  # biases and norms are never decayed
        m = tr.schedules.momentum[it]
        for old, t, s in zip(
            teacher_before, tr.teacher.parameters(), tr.student_plain.parameters(), strict=True
        ):
            torch.testing.assert_close(t, m * old + (1 - m) * s.detach(), rtol=0, atol=1e-6)
        frozen = torch.equal(tr.student_plain.head.last_layer.weight_v, last)
        assert frozen == (it < 2), f"last layer frozen only for the first 2 steps (it {it})"
        if it == 1:
            batches = iter(tr.loader)


@pytest.mark.parametrize("batch_augment", [False, True], ids=["loader-crops", "batch-crops"])
def test_resume_takes_the_same_next_step(tmp_path, batch_augment):
    cfg = tiny_config(epochs=3, batch_augment=batch_augment)
    full = _trainer(tmp_path / "full", cfg)
    full.fit()
    first = _trainer(tmp_path / "cut", cfg)
    first.fit(stop_after_epochs=1)  # an interrupted run: one epoch, then the process ends
    resumed = _trainer(tmp_path / "cut", cfg)
    resumed.load_checkpoint()
    assert (resumed.epoch, resumed.iteration) == (1, 4)
    resumed.fit()
    steps = [r for r in full.history if r["kind"] == "step" and r["iteration"] >= 4]
    again = [r for r in resumed.history if r["kind"] == "step"]
    assert [r["iteration"] for r in again] == [r["iteration"] for r in steps]
    for a, b in zip(steps, again, strict=True):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"] and a["momentum"] == b["momentum"]
    for (k, a), b in zip(
        full.teacher.state_dict().items(), resumed.teacher.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    torch.testing.assert_close(full.loss.center, resumed.loss.center, rtol=0, atol=0)


def test_resume_refuses_other_data_and_other_files(tmp_path):
    from training.checkpoints import CheckpointError, save_atomic

    first = _trainer(tmp_path, tiny_config(epochs=2))
    first.fit(stop_after_epochs=1)
    more = _trainer(tmp_path, tiny_config(epochs=2), n=64)  # 8 batches per epoch instead of 4
    with pytest.raises(CheckpointError, match="the data changed: 8 batches per epoch now, 4"):
        more.load_checkpoint()
    save_atomic({"teacher": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        first.load_checkpoint(tmp_path / "other.pth")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    tr = _trainer(tmp_path, tiny_config(epochs=3))
    tr.fit(stop_after_epochs=1)
    digest = hashlib.sha256(tr.checkpoint_path.read_bytes()).hexdigest()
    with torch.no_grad():
        tr.student_plain.backbone.cls_token.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        tr.fit()
    assert hashlib.sha256(tr.checkpoint_path.read_bytes()).hexdigest() == digest


def test_calibration_measures_and_restores_the_state(tmp_path):
    tr = _trainer(tmp_path, tiny_config(), knn=True)
    before = {k: v.clone() for k, v in tr.teacher.state_dict().items()}
    rng = torch.get_rng_state()
    step_s, knn_s = tr.calibrate()
    assert step_s > 0 and knn_s > 0
    assert tr.iteration == 0 and tr.plan is None
    for k, v in tr.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


def test_time_budget_compresses_the_schedules(tmp_path, monkeypatch):
    cfg = tiny_config(epochs=10)
    tr = _trainer(tmp_path, cfg, n=64)  # 8 steps per epoch: 80 planned
    # A fixed step time makes the planning arithmetic exact: 160 s / 5 s = 32 steps fit (a
    # planned step far slower than a real one, so a loaded machine cannot hit the deadline).
    monkeypatch.setattr(tr, "calibrate", lambda: (5.0, 0.0))
    reserve = export_reserve_s(tr.teacher.backbone)
    assert 15.0 < reserve < 16.0  # a tiny model: the fixed part only
    deadline = time.time() + 160 * STEP_MARGIN + reserve
    summary = tr.fit(deadline=deadline)
    assert tr.plan.iters_per_epoch == 8
    assert tr.plan.sched_iters_per_epoch in (2, 3)  # 32 steps over 10 epochs, less elapsed time
    assert summary["iterations"] == tr.plan.total_iters and not summary["stopped_early"]
    assert len(tr.schedules.lr) == tr.plan.total_iters
    assert tr.schedules.lr[-1] == pytest.approx(cfg.min_lr)  # the cosine still reaches its end
    assert tr.schedules.freeze_iters == round(cfg.freeze_last_layer * tr.plan.sched_iters_per_epoch)


@pytest.mark.slow
def test_tiny_end_to_end_training_learns(tmp_path):
    """Real DINO steps on digits: the student's part of the loss falls and k-NN beats the same
    network untrained.

    The loss is H(teacher, student) = H(teacher) + KL(teacher || student). In runs this short
    the teacher's entropy climbs towards ln(out_dim), so the KL term, which is
    what the student's gradient acts on, is the quantity that must fall.
    """
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine
    images, labels = digits(size=16)
    order = np.random.default_rng(0).permutation(len(images))
    train = ArrayDataset(images[order[:1200]], labels[order[:1200]])
    test = ArrayDataset(images[order[1200:]], labels[order[1200:]])
    cfg = tiny_config(
        vit_depth=2, n_local_crops=2, out_dim=1024, head_hidden_dim=512, head_bottleneck_dim=128,
        batch_size=64, epochs=4, warmup_epochs=1, lr=4e-3, momentum_teacher=0.99,
        drop_path_rate=0.0, freeze_last_layer=0, log_every=5, precision="auto",
    )  # fmt: skip
    tr = Trainer(cfg, train, tmp_path, knn_sets=(train, test), show_progress=False)
    untrained = tr.run_knn("knn_untrained.json")
    tr.fit()
    trained = tr.run_knn()
    steps = [r for r in tr.history if r["kind"] == "step"]
    kl = [r["loss"] - r["teacher_entropy"] for r in steps]
    assert all(np.isfinite(kl)) and min(kl) > -1e-3  # cross-entropy >= entropy
    assert np.mean(kl[-3:]) < 0.5 * np.mean(kl[:3])
    assert trained["top1"] > untrained["top1"] + 5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "knn"} <= {r["kind"] for r in rows}
    assert dataclasses.asdict(cfg) == torch.load(tr.checkpoint_path, weights_only=False)["config"]


def test_knn_command_on_a_training_checkpoint(tmp_path):
    from training.knn import run as knn_main

    images, labels = digits(60)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (tmp_path / "data" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "data" / str(label) / f"{i}.png")
    tr = _trainer(tmp_path / "run", tiny_config(epochs=1))
    tr.fit()
    args = ["--checkpoint", str(tr.checkpoint_path), "--data", str(tmp_path / "data")]
    trained = knn_main([*args, "--precision", "fp32"])
    untrained = knn_main([*args, "--precision", "fp32", "--untrained"])
    assert trained["n_test"] > 0 and 0 <= trained["top1"] <= 100
    assert json.loads((tmp_path / "run" / "knn.json").read_text())["top1"] == trained["top1"]
    assert (tmp_path / "run" / "knn_untrained.json").is_file() and untrained["untrained"]


def test_batch_crops_are_the_quickstart_default_and_grey_only(tmp_path):
    from training.config import config_from_args, preset
    from training.run import parse_args

    assert preset("quickstart").batch_augment and preset("quickstart").num_workers == 0
    # Own photos: colour crops per image in a loader worker.
    own = config_from_args(parse_args(["--preset", "quickstart", "--data", str(tmp_path)]))
    assert not own.batch_augment and not own.grayscale and own.num_workers == 1
    with pytest.raises(ValueError, match="--batch-augment false"):
        tiny_config(batch_augment=True, grayscale=False).validate()


def test_a_step_adds_the_weighted_koleo_term(tmp_path):
    losses = {}
    for weight in (0.0, 0.5):
        cfg = tiny_config(koleo_weight=weight, seed=3)
        tr = _trainer(tmp_path / str(weight), cfg)
        tr.build_schedules(Plan(len(tr.loader), len(tr.loader), cfg.epochs))
        batch = next(iter(tr.loader))[0]
        torch.manual_seed(0)
        crops = tr._crops(batch)
        with torch.no_grad():
            out, feats = tr.student(crops, return_backbone=True)
            spread = koleo_per_crop(feats[: 2 * tr.batch_per_rank], 2).item()
            dino = tr.loss(out, tr.teacher(crops[:2]), 0).item()
        tr.loss.center.zero_()  # the probe above moved the centre; start the step from 0 again
        torch.manual_seed(0)
        losses[weight] = (tr._step(batch), dino, spread)
    step0, dino0, _ = losses[0.0]
    step5, dino5, spread5 = losses[0.5]
    assert step0 == pytest.approx(dino0, abs=1e-5)
    assert step5 == pytest.approx(dino5 + 0.5 * spread5, abs=1e-5)
