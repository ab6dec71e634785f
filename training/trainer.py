"""The DINO training loop: student and EMA teacher, per-iteration schedules, checkpoints, resume.

Schedules are indexed by the global iteration; a time budget compresses them up front
(``training.budget``). The position in the run is one ``TrainState`` that only this class
advances; ``training.run_state`` saves it and hands it back on resume.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from training import budget
from training.batch_augment import batch_generator
from training.checkpoints import read_checkpoint, save_atomic
from training.config import TrainConfig
from training.distributed import DistInfo, all_reduce_mean, any_rank, barrier, broadcast_object
from training.head import cancel_last_layer_gradients, get_params_groups
from training.knn_served import FittedTransform, evaluate_served_knn, served_embedding
from training.koleo import koleo_per_crop
from training.loss import DINOLoss
from training.masked_patches import PatchDistillLoss, draw_patch_masks
from training.metrics_log import MetricsLog
from training.networks import build_student_teacher
from training.precision import autocast, resolve_precision
from training.rng import seed_everything
from training.run_state import (
    CHECKPOINT_NAME,
    preserved,
    restore_rng,
    restore_training_state,
    training_state,
)
from training.schedules import Schedules, build_schedules
from training.state import Plan, TrainState
from training.train_loader import build_train_loader, knn_eval_sets
from training.updates import clip_gradients, ema_update

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class Trainer:
    """Owns models, optimiser, loss, data loader and the run folder (rank 0 writes)."""

    def __init__(
        self,
        cfg: TrainConfig,
        train_set: Dataset,
        run_dir: str | Path,
        dist: DistInfo | None = None,
        knn_sets: tuple[Dataset, Dataset] | None = None,
        show_progress: bool = True,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.dist = dist or DistInfo()
        self.device = self.dist.device
        self.run_dir = Path(run_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.show_progress = show_progress and self.dist.is_main
        self.precision = resolve_precision(cfg.precision, self.device)
        seed_everything(cfg.seed + self.dist.rank)
        data = build_train_loader(cfg, train_set, self.dist)
        self.dataset, self.sampler, self.loader = data.dataset, data.sampler, data.loader
        self.batch_aug, self.ncrops = data.batch_aug, data.n_crops
        self.batch_per_rank = data.batch_per_rank
        self.knn_sets = knn_eval_sets(cfg, knn_sets)
        self.embedding_fit: FittedTransform | None = None  # the last k-NN's, for the export
        self.student_plain, self.student, self.teacher = build_student_teacher(cfg, self.dist)
        self._build_optimisation()
        self.state = TrainState()
        self.schedules: Schedules | None = None
        self.history: list[dict] = []
        self.last_koleo: torch.Tensor | None = None  # the step's unweighted extra loss terms
        self.last_mim: torch.Tensor | None = None
        self.metrics = MetricsLog(self.run_dir)
        # Time kept after training for the export; planning adds the k-NN.
        self.reserve_s = budget.export_reserve_s(self.teacher.backbone)

    def _build_optimisation(self) -> None:
        cfg = self.cfg
        groups = get_params_groups(self.student_plain)
        if cfg.optimizer == "adamw":
            # The fused kernel: one pass over all parameters (4.5x faster on CPU than the default
            # per-parameter loop for the quickstart's 3.4M parameters), same update rule.
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, fused=True)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9)
        self.loss = DINOLoss(
            cfg.out_dim,
            self.ncrops,
            cfg.warmup_teacher_temp,
            cfg.teacher_temp,
            cfg.warmup_teacher_temp_epochs,
            cfg.epochs,
            centering=cfg.teacher_centering,
        ).to(self.device)
        self.patch_loss = PatchDistillLoss(cfg.out_dim).to(self.device) if cfg.mim_weight else None

    # ------------------------------------------------------------ position in the run

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def iteration(self) -> int:
        return self.state.iteration

    @property
    def plan(self) -> Plan | None:
        return self.state.plan

    def _parts(self) -> dict[str, nn.Module | torch.optim.Optimizer | None]:
        """Everything with weights or statistics, by its checkpoint name."""
        return {
            "student": self.student_plain,
            "teacher": self.teacher,
            "optimizer": self.optimizer,
            "dino_loss": self.loss,
            "patch_loss": self.patch_loss,
        }

    # ------------------------------------------------------------ schedules and planning

    def build_schedules(self, plan: Plan) -> None:
        self.state.plan = plan
        self.schedules = build_schedules(self.cfg, plan)

    def plan_run(self, deadline: float | None) -> Plan:
        """Full schedule, or one compressed so training, k-NN and export end by ``deadline``."""
        n = len(self.loader)
        if deadline is None:
            return Plan(n, n, self.cfg.epochs)
        step_s, knn_s = self.calibrate()
        self.reserve_s = knn_s + budget.export_reserve_s(self.teacher.backbone)
        return budget.plan_for_deadline(n, self.cfg.epochs, deadline, step_s, self.reserve_s)

    def calibrate(self) -> tuple[float, float]:
        """Seconds per training step and an estimate of the k-NN time; all state is restored."""
        n = len(self.loader)
        before = self.state, self.schedules
        with preserved(self._parts()):
            self.state = TrainState()
            self.build_schedules(Plan(n, n, self.cfg.epochs))
            steps = min(budget.CALIBRATION_STEPS, n)
            batches = (images for images, _ in itertools.islice(self.loader, steps))
            step_s = budget.median_step_s(self._step, batches)
            knn_s = 0.0
            if self.knn_sets and self.dist.is_main:
                knn_s = budget.knn_estimate_s(
                    self.teacher.backbone,
                    self.knn_sets,
                    batch_size=self.cfg.knn_batch_size,
                    num_workers=self.cfg.num_workers,
                    device=self.device,
                    bf16=self.precision == "bf16",
                )
        self.state, self.schedules = before
        return step_s, float(broadcast_object(knn_s))

    # ------------------------------------------------------------ one step

    def _sched_epoch(self) -> int:
        return self.state.iteration // self.state.plan.sched_iters_per_epoch

    def _crops(self, batch: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """The loader's crops, or (batch mode) this iteration's crops cut from the images."""
        if self.batch_aug is None:
            return [c.to(self.device, non_blocking=True) for c in batch]
        gen = batch_generator(self.cfg.seed, self.dist.rank, self.state.iteration)
        return self.batch_aug(batch.to(self.device, non_blocking=True), gen)

    def _patch_masks(self) -> torch.Tensor | None:
        """This step's hidden patches of the global crops (iBOT), ``None`` when MIM is off."""
        if self.patch_loss is None:
            return None
        gen = batch_generator(self.cfg.seed, self.dist.rank, self.state.iteration)
        gen.manual_seed(gen.initial_seed() + 0x9E3779B9)  # a stream apart from the crops'
        grid = self.cfg.global_size // self.cfg.patch_size
        masks = draw_patch_masks(
            2 * self.batch_per_rank, grid * grid, self.cfg.mim_ratio, self.cfg.mim_prob, gen
        )
        return masks.to(self.device)

    def _loss(self, crops: list[torch.Tensor], masks: torch.Tensor | None) -> torch.Tensor:
        """DINO's loss on the crops, plus the weighted MIM and KoLeo terms when they are on."""
        if masks is None:
            with torch.no_grad():
                teacher_out = self.teacher(crops[:2])
            student_out, features = self.student(crops, return_backbone=True)
        else:  # iBOT: the student predicts the teacher's view of the patches it cannot see
            with torch.no_grad():
                teacher_out, _, teacher_patches = self.teacher(crops[:2], patch_positions=masks)
            student_out, features, student_patches = self.student(
                crops, patch_positions=masks, mask_patches=True
            )
        loss = self.loss(student_out, teacher_out, self._sched_epoch())
        if masks is not None:
            temp = self.loss.teacher_temp_at(self._sched_epoch())
            mim = self.patch_loss(student_patches, teacher_patches, temp)
            self.last_mim = mim.detach()
            loss = loss + self.cfg.mim_weight * mim
        if self.cfg.koleo_weight:
            # On the global crops' rows only (the first 2*B), as DINOv2 does.
            spread = koleo_per_crop(features[: 2 * self.batch_per_rank], 2)
            self.last_koleo = spread.detach()
            loss = loss + self.cfg.koleo_weight * spread
        return loss

    def _step(self, batch: torch.Tensor | list[torch.Tensor]) -> float:
        it, sched = self.state.iteration, self.schedules
        crops = self._crops(batch)
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(sched.lr[it])
            if i == 0:  # only the decayed group; biases and norms keep weight_decay 0
                group["weight_decay"] = float(sched.weight_decay[it])
        masks = self._patch_masks()
        with autocast(self.precision, self.device):
            loss = self._loss(crops, masks)
        value = all_reduce_mean(loss.detach().float()).item()
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss is {value} at iteration {it} (epoch {self.state.epoch}); stopping. The "
                f"last good checkpoint is {self.checkpoint_path}. Try a lower --lr, --precision "
                "fp32 or a longer --warmup-epochs."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad:
            clip_gradients(self.student_plain, self.cfg.clip_grad)
        # Compared in iterations so that fractional / budget-scaled freeze lengths work.
        cancel_last_layer_gradients(self.student_plain, it, sched.freeze_iters)
        self.optimizer.step()
        ema_update(self.teacher, self.student_plain, float(sched.momentum[it]))
        self.state.iteration += 1
        return value

    # ------------------------------------------------------------ the loop

    def fit(self, deadline: float | None = None, stop_after_epochs: int | None = None) -> dict:
        """Train until the schedule ends (or ``stop_after_epochs`` passes, for tests/interrupts).

        Past ``deadline`` minus the k-NN/export reserve the loop stops early with a warning.
        """
        if self.state.plan is None:
            self.build_schedules(self.plan_run(deadline))
        stop_at = None if deadline is None else deadline - self.reserve_s
        t_start = time.time()
        stopped_early = False
        while not self.state.finished and not stopped_early:
            t_epoch = time.time()
            losses, stopped_early = self._train_epoch(stop_at, t_start)
            self._end_epoch(losses, time.time() - t_epoch)
            if stop_after_epochs is not None and self.state.epoch >= stop_after_epochs:
                break
        return {
            "iterations": self.state.iteration,
            "epochs": self.state.epoch,
            "seconds": time.time() - t_start,
            "stopped_early": stopped_early,
            "final_loss": self.history[-1]["loss"] if self.history else None,
        }

    def _train_epoch(self, stop_at: float | None, t_start: float) -> tuple[list[float], bool]:
        """One pass over the data (or what is left of the plan): the step losses, and whether
        the deadline stopped it."""
        plan = self.state.plan
        self.sampler.set_epoch(self.state.epoch)
        epochs = math.ceil(plan.total_iters / plan.iters_per_epoch)
        bar = tqdm(
            self.loader,
            total=min(len(self.loader), plan.total_iters - self.state.iteration),
            desc=f"epoch {self.state.epoch + 1}/{epochs}",
            disable=not self.show_progress,
            dynamic_ncols=True,
        )
        losses: list[float] = []
        t_last, n_last = time.time(), 0
        for batch, _ in bar:
            if self.state.finished:
                break
            it = self.state.iteration
            losses.append(self._step(batch))
            n_last += 1
            if it % self.cfg.log_every == 0 or self.state.finished:
                now = time.time()
                row = self._step_row(it, losses[-1], n_last / max(now - t_last, 1e-9))
                row["time"] = now - t_start
                t_last, n_last = now, 0
                self._log_metrics(row)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", H=f"{row['teacher_entropy']:.2f}")
            if stop_at is not None and any_rank(time.time() > stop_at):
                log.warning("time budget reached at iteration %d: stopping early", it + 1)
                return losses, True
        return losses, False

    def _step_row(self, it: int, loss: float, steps_per_s: float) -> dict:
        """The metrics row of step ``it`` (logged every ``log_every`` steps)."""
        sched = self.schedules
        return {
            "kind": "step",
            "epoch": self.state.epoch,
            "iteration": it,
            "loss": loss,
            "lr": float(sched.lr[it]),
            "wd": float(sched.weight_decay[it]),
            "momentum": float(sched.momentum[it]),
            "teacher_temp": self.loss.teacher_temp_at(self._sched_epoch()),
            "teacher_entropy": self.loss.last_teacher_entropy,
            # The unweighted KoLeo term ("loss" includes koleo_weight times it).
            "koleo": None if self.last_koleo is None else float(self.last_koleo),
            "mim": None if self.last_mim is None else float(self.last_mim),
            "ln_out_dim": math.log(self.cfg.out_dim),
            "img_per_s": steps_per_s * self.cfg.batch_size,
        }

    def _end_epoch(self, losses: list[float], seconds: float) -> None:
        """Count the pass, log it, checkpoint, and run the periodic k-NN (not after the last)."""
        self.state.epoch += 1
        self._log_metrics(
            {
                "kind": "epoch",
                "epoch": self.state.epoch - 1,
                "iteration": self.state.iteration,
                "loss": float(np.mean(losses)) if losses else float("nan"),
                "seconds": seconds,
                "img_per_s": len(losses) * self.cfg.batch_size / max(seconds, 1e-9),
            }
        )
        self.save_checkpoint()
        every = self.cfg.knn_every
        if every and self.state.epoch % every == 0 and not self.state.finished:
            self.run_knn(f"knn_epoch{self.state.epoch}.json")

    # ------------------------------------------------------------ evaluation and output

    def run_knn(self, filename: str = "knn.json") -> dict | None:
        """k-NN of the teacher backbone (rank 0; others wait). ``None`` without labels."""
        if self.knn_sets is None:
            return None
        result = None
        if self.dist.is_main:
            result, self.embedding_fit = evaluate_served_knn(
                self.teacher.backbone,
                *self.knn_sets,
                **served_embedding(self.cfg),
                k=self.cfg.knn_k,
                temperature=self.cfg.knn_temperature,
                batch_size=self.cfg.knn_batch_size,
                num_workers=self.cfg.num_workers,
                device=self.device,
                bf16=self.precision == "bf16",
                show_progress=self.show_progress,
            )
            result.update(epoch=self.state.epoch, iteration=self.state.iteration)
            (self.run_dir / filename).write_text(json.dumps(result, indent=2) + "\n")
            self._log_metrics({"kind": "knn", **result})
        barrier()
        return result

    def _log_metrics(self, row: dict) -> None:
        self.history.append(row)
        if self.dist.is_main:
            self.metrics.write(row)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            save_atomic(training_state(self), self.checkpoint_path)
        barrier()

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        """Restore everything a resumed run needs to take the same next step."""
        path = Path(path or self.checkpoint_path)
        saved = read_checkpoint(path)
        self.state = state = restore_training_state(self._parts(), saved, path, len(self.loader))
        self.build_schedules(state.plan)
        d = self.dist
        restore_rng(saved, is_main=d.is_main, seed=self.cfg.seed, rank=d.rank, epoch=state.epoch)
        log.info("resumed from %s at epoch %d, iteration %d", path, state.epoch, state.iteration)
