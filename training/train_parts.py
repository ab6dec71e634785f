"""Pieces of a DINO step that are not the loop itself: precision choice, EMA, clipping, RNG
state, the schedule geometry and the student/teacher network builder."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.backbones import build_backbone
from training.config import TrainConfig
from training.head import DINOHead, MultiCropWrapper

log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """True when the CPU has bf16 matrix units (AMX) or AVX-512 bf16 instructions."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA with bf16 support or a bf16-capable CPU, else ``fp32``."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- m * teacher + (1 - m) * student`` for every parameter."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's clipping: each parameter's gradient norm is capped at ``clip`` separately."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    # One fused pass over all gradients instead of two small kernels per parameter.
    norms = torch.stack(torch._foreach_norm(grads, 2))
    scales = torch.clamp(clip / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_wrapper(cfg: TrainConfig, drop_path: bool) -> MultiCropWrapper:
    backbone = build_backbone(
        cfg.arch, patch_size=cfg.patch_size, **cfg.backbone_kwargs(drop_path=drop_path)
    )
    head = DINOHead(
        backbone.embed_dim,
        cfg.out_dim,
        use_bn=cfg.use_bn_in_head,
        norm_last_layer=cfg.norm_last_layer,
        hidden_dim=cfg.head_hidden_dim,
        bottleneck_dim=cfg.head_bottleneck_dim,
    )
    # DINOv2/v3 backbones hold the official ``mask_token`` themselves.
    own_token = getattr(backbone, "mask_token", None) is not None
    mask_dim = backbone.embed_dim if cfg.mim_weight and not own_token else 0
    return MultiCropWrapper(backbone, head, mask_token_dim=mask_dim)


class MetricsLog:
    """JSON lines in ``run_dir/metrics.jsonl``, plus TensorBoard scalars when it is installed."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._tb = None

    def write(self, row: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if row["kind"] == "epoch":
            log.info(
                "epoch %d done: loss %.4f, %.0f img/s, %.1f s",
                row["epoch"] + 1,
                row["loss"],
                row["img_per_s"],
                row["seconds"],
            )
        tb = self._tensorboard()
        if tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "iteration"):
                    tb.add_scalar(f"{row['kind']}/{k}", v, row.get("iteration", 0))

    def _tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: only when tensorboard is installed
                self._tb = False
            else:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tb or None
