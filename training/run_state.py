"""What a training checkpoint holds, and putting it back so a resumed run takes the same step.

The pieces are generic over named parts (anything with ``state_dict`` / ``load_state_dict``):
the DINO trainer and the decoder training of ``training.invert`` save and resume through them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from training.checkpoints import CheckpointError
from training.rng import rng_state, seed_everything, set_rng_state
from training.state import Plan, TrainState

FORMAT_TAG = "dino-feature-service/train-checkpoint/v1"
CHECKPOINT_NAME = "checkpoint.pth"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


def state_dicts(parts: Mapping[str, Stateful | None]) -> dict[str, dict | None]:
    """Each part's ``state_dict()`` under its name (``None`` for an absent part)."""
    return {name: None if part is None else part.state_dict() for name, part in parts.items()}


def load_state_dicts(parts: Mapping[str, Stateful | None], saved: Mapping[str, Any]) -> None:
    """The inverse of ``state_dicts``; absent parts are skipped."""
    for name, part in parts.items():
        if part is not None:
            part.load_state_dict(saved[name])


@contextlib.contextmanager
def preserved(parts: Mapping[str, Stateful | None]) -> Iterator[None]:
    """Everything in ``parts`` and the RNG states are put back as they were on leaving."""
    saved = copy.deepcopy((state_dicts(parts), rng_state()))
    try:
        yield
    finally:
        load_state_dicts(parts, saved[0])
        set_rng_state(saved[1])


def training_state(trainer: Any) -> dict:
    """Models, optimiser, loss centres, position in the schedule, config and RNG states of a
    ``training.trainer.Trainer`` (not imported here: the trainer imports this module).

    Everything is tensors or plain data (the config and plan as ``asdict`` dicts, rebuilt on
    load), so ``read_checkpoint`` loads it without admitting any class of this project."""
    patch_loss = trainer.patch_loss
    return {
        "format": FORMAT_TAG,
        "student": trainer.student_plain.state_dict(),
        "teacher": trainer.teacher.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "dino_loss": trainer.loss.state_dict(),
        "patch_loss": None if patch_loss is None else patch_loss.state_dict(),
        "epoch": trainer.epoch,
        "iteration": trainer.iteration,
        "plan": asdict(trainer.plan),
        "config": trainer.cfg.to_dict(),
        "rng": rng_state(),
    }


def restore_training_state(
    parts: Mapping[str, Stateful | None], state: dict, path: Path, iters_per_epoch: int
) -> TrainState:
    """Load ``training_state``'s parts back and return the position it was saved at; ``path``
    only names the file in errors. ``iters_per_epoch`` is the loader's length now."""
    if state.get("format") != FORMAT_TAG:
        raise CheckpointError(
            f"{path} is not a training checkpoint of this project (format "
            f"{state.get('format')!r}); --resume needs the checkpoint.pth of a run folder"
        )
    for key in ("config", "plan"):  # plain dicts by design: objects never travel in checkpoints
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path}: {key!r} is not a dict of plain values")
    load_state_dicts(parts, state)
    plan = Plan(**state["plan"])
    if plan.iters_per_epoch != iters_per_epoch:
        raise CheckpointError(
            f"the data changed: {iters_per_epoch} batches per epoch now, "
            f"{plan.iters_per_epoch} when {path} was written"
        )
    return TrainState(epoch=int(state["epoch"]), iteration=int(state["iteration"]), plan=plan)


def restore_rng(state: dict, *, is_main: bool, seed: int, rank: int, epoch: int) -> None:
    """Rank 0 takes the saved RNG states; other ranks get their own stream for this epoch."""
    if is_main:
        set_rng_state(state["rng"])
    else:
        seed_everything(seed + 1000 * epoch + rank)
