"""iBOT's masked image modelling on top of DINO (Zhou et al. 2022, "iBOT").

The student sees its two global crops with some patches hidden behind a learnable mask token
and predicts, at each hidden position, the teacher's head output for the visible patch there:
the same centred, sharpened cross-entropy as DINO's CLS loss, one target per patch token
instead of one per image. It gives the backbone a dense signal per step, which is what a
few-thousand-step run is short of. Off unless ``--mim-weight`` is set.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def draw_patch_masks(
    n_images: int,
    n_patches: int,
    ratio: tuple[float, float],
    prob: float,
    generator: torch.Generator,
) -> Tensor:
    """``[n_images, n_patches]`` bool, True = hidden.

    Each image is masked with probability ``prob``; a masked image hides a fraction drawn
    uniformly from ``ratio`` of its patches (at least one, never all), chosen at random. At
    least two positions are hidden in all, so the head's BatchNorm always sees a batch.
    """
    lo, hi = ratio
    if not (0 < lo <= hi < 1) or not (0 < prob <= 1):
        raise ValueError(f"mask ratio must satisfy 0 < lo <= hi < 1 and 0 < prob <= 1, got {ratio}")
    if n_patches < 2:
        raise ValueError(f"masking needs at least 2 patches per image, got {n_patches}")
    masked_image = torch.rand(n_images, generator=generator) < prob
    masked_image[: max(0, 2 - int(masked_image.sum()))] = True
    fraction = lo + (hi - lo) * torch.rand(n_images, generator=generator)
    count = (fraction * n_patches).round().clamp(1, n_patches - 1).long()
    # The `count` smallest of a random score per patch: a uniform random subset of that size.
    rank = torch.rand(n_images, n_patches, generator=generator).argsort(dim=1).argsort(dim=1)
    return (rank < count[:, None]) & masked_image[:, None]


class PatchDistillLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student at hidden patches.

    Rows are the hidden positions of both global crops (``[M, K]`` each, the same order for
    teacher and student); the loss is their mean. The patch targets have their own EMA centre
    (iBOT's ``center2``): patch tokens and CLS tokens have different means.
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._last_entropy: Tensor | None = None

    @property
    def last_teacher_entropy(self) -> float:
        """Mean entropy (nats) of the patch targets in the last forward."""
        return float("nan") if self._last_entropy is None else float(self._last_entropy)

    def forward(self, student_patches: Tensor, teacher_patches: Tensor, teacher_temp: float):
        if student_patches.shape != teacher_patches.shape or student_patches.ndim != 2:
            raise ValueError(
                f"student and teacher patch outputs must be the same [M, K], got "
                f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}"
            )
        teacher = teacher_patches.detach().float()
        targets = F.softmax((teacher - self.center) / teacher_temp, dim=-1)
        log_student = F.log_softmax(student_patches.float() / self.student_temp, dim=-1)
        loss = -(targets * log_student).sum(dim=-1).mean()
        with torch.no_grad():
            self._last_entropy = -(targets * targets.clamp_min(1e-30).log()).sum(-1).mean()
            self._update_center(teacher)
        return loss

    @torch.no_grad()
    def _update_center(self, teacher: Tensor) -> None:
        # Processes hide different numbers of patches: reduce sums and counts, not means.
        stats = torch.cat((teacher.sum(dim=0), teacher.new_tensor([teacher.shape[0]])))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
