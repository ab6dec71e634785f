"""Per-iteration schedules (learning rate, weight decay, teacher momentum) as DINO defines them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.state import Plan


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int | float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """One value per iteration: linear warm-up from ``start_warmup_value`` to ``base_value`` over
    ``warmup_epochs``, then a half cosine from ``base_value`` down (or up) to ``final_value``.

    The array has exactly ``epochs * niter_per_ep`` entries; index it with the global iteration.
    """
    if epochs <= 0 or niter_per_ep <= 0:
        raise ValueError(f"epochs ({epochs}) and niter_per_ep ({niter_per_ep}) must be positive")
    total = int(epochs * niter_per_ep)
    warmup_iters = int(round(warmup_epochs * niter_per_ep))
    if warmup_iters < 0 or warmup_iters > total:
        raise ValueError(f"warmup_epochs {warmup_epochs} must lie between 0 and epochs {epochs}")
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters else []
    steps = np.arange(total - warmup_iters)
    # With a single cosine step the denominator would be 0; that one step takes base_value.
    span = max(len(steps) - 1, 1)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / span))
    schedule = np.concatenate((np.asarray(warmup, dtype=np.float64), cosine))
    assert len(schedule) == total
    return schedule


def scaled_lr(base_lr: float, total_batch: int) -> float:
    """DINO's linear scaling rule: the learning rate given for a batch of 256 images."""
    if total_batch <= 0:
        raise ValueError(f"total batch size must be positive, got {total_batch}")
    return base_lr * total_batch / 256.0


@dataclass
class Schedules:
    """A run's per-iteration values, indexed by the global iteration."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray  # the teacher's EMA momentum
    freeze_iters: int  # the head's last layer gets no gradient before this iteration


def build_schedules(cfg: TrainConfig, plan: Plan) -> Schedules:
    """The config's schedules laid over ``plan``: epoch lengths in its (maybe budgeted) steps."""
    n = plan.sched_iters_per_epoch
    warm = min(cfg.warmup_epochs, cfg.epochs)
    lr_peak = scaled_lr(cfg.lr, cfg.batch_size)
    return Schedules(
        lr=cosine_scheduler(lr_peak, cfg.min_lr, cfg.epochs, n, warm),
        weight_decay=cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, n),
        momentum=cosine_scheduler(cfg.momentum_teacher, cfg.momentum_teacher_end, cfg.epochs, n),
        freeze_iters=int(round(cfg.freeze_last_layer * n)),
    )
