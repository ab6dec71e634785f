"""Where a run stands: the schedule geometry (``Plan``) and the position in it (``TrainState``).

Both are plain data, saved in the checkpoint and handed back by ``run_state`` on resume; the
trainer owns the one ``TrainState`` of a run and is the only code that advances it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Plan:
    """The schedule geometry, stored in the checkpoint so a resumed run rebuilds it exactly."""

    iters_per_epoch: int  # real batches per pass over the data
    sched_iters_per_epoch: int  # iterations one config epoch spans (< iters_per_epoch if budgeted)
    epochs: int

    @property
    def total_iters(self) -> int:
        return self.epochs * self.sched_iters_per_epoch

    @property
    def scale(self) -> float:
        return self.sched_iters_per_epoch / self.iters_per_epoch


@dataclass
class TrainState:
    """Passes over the data completed, optimiser steps taken, and the plan they follow."""

    epoch: int = 0
    iteration: int = 0
    plan: Plan | None = None

    @property
    def finished(self) -> bool:
        return self.plan is not None and self.iteration >= self.plan.total_iters
