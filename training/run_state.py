"""What a training checkpoint holds, and putting it back so a resumed run takes the same step."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from training.checkpoints import CheckpointError
from training.train_parts import Plan, rng_state, seed_everything, set_rng_state

if TYPE_CHECKING:
    from training.trainer import Trainer

FORMAT_TAG = "dino-feature-service/train-checkpoint/v1"
CHECKPOINT_NAME = "checkpoint.pth"


def training_state(trainer: Trainer) -> dict:
    """Models, optimiser, loss centres, position in the schedule, config and RNG states.

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


def restore_training_state(trainer: Trainer, state: dict, path: Path) -> None:
    """The inverse of ``training_state``; ``path`` only names the file in errors."""
    if state.get("format") != FORMAT_TAG:
        raise CheckpointError(
            f"{path} is not a training checkpoint of this project (format "
            f"{state.get('format')!r}); --resume needs the checkpoint.pth of a run folder"
        )
    for key in ("config", "plan"):  # plain dicts by design: objects never travel in checkpoints
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path}: {key!r} is not a dict of plain values")
    trainer.student_plain.load_state_dict(state["student"])
    trainer.teacher.load_state_dict(state["teacher"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.loss.load_state_dict(state["dino_loss"])
    if trainer.patch_loss is not None:
        trainer.patch_loss.load_state_dict(state["patch_loss"])
    trainer.epoch, trainer.iteration = int(state["epoch"]), int(state["iteration"])
    trainer.build_schedules(Plan(**state["plan"]))
    if trainer.plan.iters_per_epoch != len(trainer.loader):
        raise CheckpointError(
            f"the data changed: {len(trainer.loader)} batches per epoch now, "
            f"{trainer.plan.iters_per_epoch} when {path} was written"
        )
    if trainer.dist.is_main:
        set_rng_state(state["rng"])
    else:  # the saved state is rank 0's; other ranks get their own stream
        seed_everything(trainer.cfg.seed + 1000 * trainer.epoch + trainer.dist.rank)
