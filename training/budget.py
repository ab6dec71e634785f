"""Fitting a run into a time budget.

A few real training steps are timed (and then undone: weights, optimiser, loss centre and RNG
go back to where they were), the k-NN is estimated from a probe, and the schedules are
compressed so that training, k-NN and export end by the deadline: every epoch-denominated
length is scaled by the same factor, so a short run is the same recipe compressed rather than
a long recipe cut off.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Subset

from training.distributed import broadcast_object
from training.knn import extract_features
from training.train_parts import Plan, rng_state, set_rng_state

if TYPE_CHECKING:
    from training.trainer import Trainer

log = logging.getLogger(__name__)

CALIBRATION_STEPS = 6
# The calibration's median step misses the loop's extras (logging, the progress bar, epoch-end
# checkpoints) and the machine's drift either way: 0.270 s planned against 0.29 run (the deadline
# then cut the last 7 % of the cosine), and on another day 0.332 planned against 0.32 run (an
# 8 % margin then left 1.6 of 14 minutes unused). A small margin splits the difference.
STEP_MARGIN = 1.03


def export_reserve_s(model: torch.nn.Module) -> float:
    """Seconds kept for export and parity checks: 15 s plus 1.5 s per million parameters
    (the quickstart's 2.6 M-parameter ViT exports and checks in under 1 s; the time grows with
    the model, and the int8 variant adds a quantisation pass)."""
    params = sum(p.numel() for p in model.parameters())
    return 15.0 + 1.5 * params / 1e6


def plan_for_deadline(trainer: Trainer, deadline: float | None) -> Plan:
    """The full schedule, or one compressed so that the run ends by ``deadline``."""
    cfg, n = trainer.cfg, len(trainer.loader)
    plan = Plan(n, n, cfg.epochs)
    if deadline is None:
        return plan
    step_s, knn_s = trainer._calibrate()
    trainer.reserve_s = knn_s + export_reserve_s(trainer.teacher.backbone)
    available = deadline - time.time() - trainer.reserve_s
    fit = max(int(available / (step_s * STEP_MARGIN)), cfg.epochs)
    if fit < plan.total_iters:
        plan = Plan(n, max(fit // cfg.epochs, 1), cfg.epochs)
    plan = broadcast_object(plan)
    log.info(
        "plan: %.3f s/step (x%.2f margin), k-NN and export ~%.0f s; %d steps (%.2f passes "
        "over the data, schedules x%.3f), training ends in ~%.1f min",
        step_s,
        STEP_MARGIN,
        trainer.reserve_s,
        plan.total_iters,
        plan.total_iters / n,
        plan.scale,
        plan.total_iters * step_s * STEP_MARGIN / 60,
    )
    return plan


def calibrate(trainer: Trainer) -> tuple[float, float]:
    """Seconds per training step and an estimate of the k-NN time; all state is restored."""
    tr = trainer
    saved = copy.deepcopy(
        (tr.student_plain.state_dict(), tr.teacher.state_dict(), tr.optimizer.state_dict(),
         tr.loss.state_dict(), rng_state())
    )  # fmt: skip
    n = len(tr.loader)
    tr.build_schedules(Plan(n, n, tr.cfg.epochs))
    times = []
    batches = iter(tr.loader)
    t = time.perf_counter()
    for _ in range(min(CALIBRATION_STEPS, n)):
        tr._step(next(batches)[0])
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
    del batches
    tr.iteration = 0
    # The first steps pay for allocator warm-up and thread start: the median of the rest.
    step_s = float(np.median(times[2:] if len(times) > 3 else times))
    knn_s = 0.0
    if tr.knn_sets and tr.dist.is_main:
        probe = Subset(tr.knn_sets[0], range(min(2 * tr.cfg.knn_batch_size, len(tr.knn_sets[0]))))
        t = time.perf_counter()
        extract_features(
            tr.teacher.backbone,
            probe,
            batch_size=tr.cfg.knn_batch_size,
            num_workers=tr.cfg.num_workers,
            device=tr.device,
            bf16=tr.precision == "bf16",
            show_progress=False,
        )
        per_image = (time.perf_counter() - t) / len(probe)
        knn_s = 1.2 * per_image * sum(len(s) for s in tr.knn_sets) + 5.0
    tr.student_plain.load_state_dict(saved[0])
    tr.teacher.load_state_dict(saved[1])
    tr.optimizer.load_state_dict(saved[2])
    tr.loss.load_state_dict(saved[3])
    set_rng_state(saved[4])
    tr.plan = None
    return step_s, float(broadcast_object(knn_s))
