"""KoLeo regulariser (Sablayrolles et al. 2019, used by DINOv2): spread features in a batch.

``-mean(log(distance to the nearest other feature))`` over L2-normalised features: it pushes
each embedding away from its closest neighbour in the batch, so features fill the sphere more
evenly. k-NN retrieval benefits directly (a crowded neighbourhood is what makes votes noisy).
An addition to DINO, off by default (``--koleo-weight 0``); the quickstart uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo loss of ``features`` ``[B, D]`` (B >= 2); the gradient flows into ``features``."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs [B >= 2, D] features, got {tuple(features.shape)}")
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        # Nearest neighbour by cosine: on the unit sphere the largest dot product is the
        # smallest distance. The diagonal (each row with itself) is excluded.
        sims = x @ x.T
        sims.fill_diagonal_(-2.0)
        nearest = sims.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()


def koleo_per_crop(features: Tensor, n_crops: int) -> Tensor:
    """Sum of the KoLeo loss of each crop's rows (``features`` is crop-major, ``[n*B, D]``):
    neighbours are sought among other images, not among views of the same image."""
    return sum(koleo_loss(chunk) for chunk in features.chunk(n_crops))
