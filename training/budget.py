"""Fitting a run into a time budget.

The trainer times a few real training steps (and then undoes them: weights, optimiser, loss
centre and RNG go back to where they were) and estimates the k-NN from a probe; this module turns
those timings into a ``Plan`` whose schedules are compressed so that training, k-NN and export
end by the deadline: every epoch-denominated length is scaled by the same factor, so a short run
is the same recipe compressed rather than a long recipe cut off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from training.distributed import broadcast_object
from training.knn import extract_features
from training.state import Plan

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


def plan_for_deadline(
    batches_per_epoch: int, epochs: int, deadline: float, step_s: float, reserve_s: float
) -> Plan:
    """The full schedule, or one compressed so that ``step_s``-second steps end ``reserve_s``
    before ``deadline``; every process gets rank 0's plan."""
    n = batches_per_epoch
    plan = Plan(n, n, epochs)
    available = deadline - time.time() - reserve_s
    fit = max(int(available / (step_s * STEP_MARGIN)), epochs)
    if fit < plan.total_iters:
        plan = Plan(n, max(fit // epochs, 1), epochs)
    plan = broadcast_object(plan)
    log.info(
        "plan: %.3f s/step (x%.2f margin), k-NN and export ~%.0f s; %d steps (%.2f passes "
        "over the data, schedules x%.3f), training ends in ~%.1f min",
        step_s,
        STEP_MARGIN,
        reserve_s,
        plan.total_iters,
        plan.total_iters / n,
        plan.scale,
        plan.total_iters * step_s * STEP_MARGIN / 60,
    )
    return plan


def median_step_s(step: Callable[[Any], object], batches: Iterable) -> float:
    """Seconds per ``step(batch)`` over ``batches``, loading included; the first steps pay for
    allocator warm-up and thread start, so the median of the rest."""
    times = []
    t = time.perf_counter()
    for batch in batches:
        step(batch)
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
    return float(np.median(times[2:] if len(times) > 3 else times))


def knn_estimate_s(
    backbone: torch.nn.Module,
    knn_sets: Sequence[Dataset],
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    bf16: bool,
) -> float:
    """The k-NN's seconds over all of ``knn_sets``, from the time of two batches plus 20 %."""
    probe = Subset(knn_sets[0], range(min(2 * batch_size, len(knn_sets[0]))))
    t = time.perf_counter()
    extract_features(
        backbone,
        probe,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        bf16=bf16,
        show_progress=False,
    )
    per_image = (time.perf_counter() - t) / len(probe)
    return 1.2 * per_image * sum(len(s) for s in knn_sets) + 5.0
