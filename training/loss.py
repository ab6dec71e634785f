"""DINO's self-distillation loss: centred, sharpened teacher vs student over multi-crop pairs."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class DINOLoss(nn.Module):
    """Cross-entropy ``H(teacher, student)`` summed over (teacher view, student view) pairs.

    ``student_output`` is ``[ncrops * B, K]`` and ``teacher_output`` ``[2 * B, K]``, both
    crop-major (rows ``i*B:(i+1)*B`` belong to crop ``i``) as ``MultiCropWrapper`` returns them;
    the teacher sees only the two global crops. Pairs where the student looks at the same view
    as the teacher are skipped. The teacher is centred (``center``, an EMA of its batch mean, which
    prevents one dimension from dominating) and sharpened (low temperature, which prevents the
    uniform collapse); the two effects balance each other.
    ``centering="sinkhorn"`` replaces the centre with DINOv2's Sinkhorn-Knopp balancing
    (``sinkhorn_knopp``).
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "ema",
    ) -> None:
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"ncrops must be at least 2 (the two global crops), got {ncrops}")
        if not 0 <= warmup_teacher_temp_epochs <= nepochs:
            raise ValueError(
                f"warmup_teacher_temp_epochs ({warmup_teacher_temp_epochs}) must lie in "
                f"[0, nepochs={nepochs}]"
            )
        if min(warmup_teacher_temp, teacher_temp, student_temp) <= 0:
            raise ValueError("temperatures must be positive")
        if centering not in ("ema", "sinkhorn"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn', got {centering!r}")
        self.centering = centering
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Linear warm-up of the teacher temperature, then constant (too hot a start would let
        # the teacher collapse to uniform; too cold destabilises the very first epochs).
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.full(nepochs - warmup_teacher_temp_epochs, teacher_temp),
            )
        )
        self._final_teacher_temp = float(teacher_temp)
        self._last_entropy: Tensor | None = None

    def teacher_temp_at(self, epoch: int) -> float:
        """Teacher temperature used at ``epoch`` (0-based); past the schedule it stays final."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch >= len(self.teacher_temp_schedule):
            return self._final_teacher_temp
        return float(self.teacher_temp_schedule[int(epoch)])

    @property
    def last_teacher_entropy(self) -> float:
        """Mean entropy (nats) of the teacher's sharpened distribution in the last forward.

        Near ``ln(out_dim)`` means the teacher is close to uniform (collapse or not yet
        learning); near 0 means one-hot. Converted lazily so ``forward`` never syncs a GPU.
        """
        if self._last_entropy is None:
            return float("nan")
        return float(self._last_entropy)

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        self._check_shapes(student_output, teacher_output)
        # Computed in fp32: under bf16 autocast the log-softmax at temperature 0.04 loses digits.
        student_out = (student_output.float() / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_at(epoch)
        teacher = teacher_output.detach().float()
        if self.centering == "sinkhorn":
            teacher_probs = sinkhorn_knopp(teacher, temp)
        else:
            teacher_probs = F.softmax((teacher - self.center) / temp, dim=-1)
        teacher_out = teacher_probs.chunk(2)

        total = student_output.new_zeros((), dtype=torch.float32)
        n_terms = 0
        for iq, q in enumerate(teacher_out):
            for v, s in enumerate(student_out):
                if v == iq:
                    continue  # same view: nothing to learn from predicting oneself
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                n_terms += 1
        with torch.no_grad():
            logp = torch.log(teacher_probs.clamp_min(1e-30))
            self._last_entropy = -(teacher_probs * logp).sum(dim=-1).mean()
        if self.centering == "ema":  # Sinkhorn-Knopp balances each batch and needs no centre
            self.update_center(teacher)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """``center <- m * center + (1 - m) * mean(teacher batch)``, the mean over all processes."""
        batch_sum = teacher_output.detach().float().sum(dim=0, keepdim=True)
        count = teacher_output.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        batch_center = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))

    def _check_shapes(self, student_output: Tensor, teacher_output: Tensor) -> None:
        if student_output.ndim != 2 or teacher_output.ndim != 2:
            raise ValueError(
                f"expected 2-D outputs, got student {tuple(student_output.shape)} and teacher "
                f"{tuple(teacher_output.shape)}"
            )
        k = self.out_dim
        if student_output.shape[1] != k or teacher_output.shape[1] != k:
            raise ValueError(
                f"outputs must have out_dim={k} columns, got student {student_output.shape[1]} "
                f"and teacher {teacher_output.shape[1]}"
            )
        n_t = teacher_output.shape[0]
        if n_t % 2:
            raise ValueError(f"teacher output must hold 2 global crops, got {n_t} rows")
        batch = n_t // 2
        if student_output.shape[0] != self.ncrops * batch:
            raise ValueError(
                f"student output has {student_output.shape[0]} rows; expected ncrops "
                f"({self.ncrops}) x batch ({batch}) = {self.ncrops * batch}"
            )


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """DINOv2's teacher targets: ``softmax(logits / temp)`` rescaled so every prototype gets an
    equal share of the batch (rows sum to 1, columns to ``rows / K``), summed over processes.

    Replaces the EMA centre: the balance holds in every batch instead of being approached.
    """
    rows, k = logits.shape
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    # Starting from each row's softmax keeps exp() finite at low temperatures; a per-row factor
    # does not move the balanced solution (the row normalisation absorbs it).
    q = F.softmax(logits.float() / temp, dim=1)
    total_rows = rows * world
    for _ in range(iterations):
        per_prototype = q.sum(dim=0, keepdim=True)
        if world > 1:
            dist.all_reduce(per_prototype)
        q = q / per_prototype.clamp_min(1e-30) / k
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-30) / total_rows
    return q * total_rows
