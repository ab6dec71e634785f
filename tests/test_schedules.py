"""Schedules: length, warm-up start and end, cosine endpoints, the linear scaling rule."""

from __future__ import annotations

import numpy as np
import pytest

from training.schedules import cosine_scheduler, scaled_lr


def test_lr_schedule_warmup_then_cosine():
    sched = cosine_scheduler(1e-3, 1e-6, epochs=10, niter_per_ep=7, warmup_epochs=2)
    assert len(sched) == 70
    assert sched[0] == 0.0  # warm-up starts at start_warmup_value
    assert sched[13] == pytest.approx(1e-3)  # last warm-up step reaches the base value
    assert sched[14] == pytest.approx(1e-3)  # cosine starts at the base value
    assert sched[-1] == pytest.approx(1e-6)  # and ends exactly at the final value
    assert np.all(np.diff(sched[:14]) > 0) and np.all(np.diff(sched[14:]) < 0)
    mid = 14 + (70 - 14 - 1) / 2  # halfway through the cosine: the mean of the ends
    assert np.interp(mid, np.arange(70), sched) == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-3)


def test_momentum_and_weight_decay_schedules_increase():
    momentum = cosine_scheduler(0.996, 1.0, epochs=3, niter_per_ep=5)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] == pytest.approx(1.0)
    assert np.all(np.diff(momentum) > 0)
    wd = cosine_scheduler(0.04, 0.4, epochs=100, niter_per_ep=1)
    assert (wd[0], wd[-1]) == (pytest.approx(0.04), pytest.approx(0.4))


def test_warmup_start_value_and_single_step():
    sched = cosine_scheduler(
        1.0, 0.0, epochs=1, niter_per_ep=4, warmup_epochs=1, start_warmup_value=0.5
    )
    np.testing.assert_allclose(sched, [0.5, 2 / 3, 5 / 6, 1.0])
    assert cosine_scheduler(2.0, 0.0, epochs=1, niter_per_ep=1).tolist() == [2.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=3, warmup_epochs=3)
    with pytest.raises(ValueError, match="positive"):
        cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=0)


def test_scaled_lr():
    assert scaled_lr(5e-4, 256) == pytest.approx(5e-4)
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)
    assert scaled_lr(5e-4, 64) == pytest.approx(1.25e-4)
    with pytest.raises(ValueError):
        scaled_lr(5e-4, 0)
