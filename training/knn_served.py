"""The k-NN of the vector the server will serve: the run's pooled embedding with its embedding
transform (the mean, and optionally a PCA whitening, fitted on the k-NN's training-image
features), next to the raw L2-normalised result DINO reports. The fitted transform is what the
export then stores beside the model (``training.centring.write_transform``), so the accuracy a
run reports is the accuracy of what ``/embed`` and the index compute.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from training.centring import fit
from training.knn import extract_features, knn_classify
from training.pooling import pooled

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FittedTransform:
    """Mean ``[D]`` and optional projection ``[D, out]`` fitted on ``images`` training images."""

    mean: np.ndarray
    projection: np.ndarray | None
    images: int

    @property
    def kind(self) -> str:
        return "centre" if self.projection is None else "whiten"

    def apply(self, features: Tensor) -> Tensor:
        """Unit rows of the transformed features (what the server returns)."""
        x = features - torch.from_numpy(self.mean)
        if self.projection is not None:
            x = x @ torch.from_numpy(self.projection)
        return F.normalize(x, dim=1)


def served_embedding(cfg) -> dict:
    """A run config's embedding settings as ``evaluate_served_knn`` keywords (``{}``: none)."""
    if cfg is None:
        return {}
    return {
        "pooling": cfg.embedding_pooling,
        "transform": cfg.embedding_centre,
        "whiten": cfg.embedding_whiten,
    }


def fit_transform(train_features: Tensor, whiten: int | None) -> FittedTransform:
    """The centring (``whiten`` None) or whitening fitted on raw training features; ``whiten``
    is capped at what the features allow (their width, one less than their count)."""
    n, dim = train_features.shape
    if whiten is not None and whiten > min(dim, n - 1):
        log.warning("whitening to %d dims, not %d: %d features of width %d allow no more",
                    min(dim, n - 1), whiten, n, dim)  # fmt: skip
        whiten = min(dim, n - 1)
    mean, projection = fit(train_features.numpy(), whiten)
    return FittedTransform(mean, projection, len(train_features))


def evaluate_served_knn(
    backbone: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    *,
    pooling: str = "cls",
    transform: bool = False,
    whiten: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    **extract: object,
) -> tuple[dict, FittedTransform | None]:
    """k-NN of ``pooling``'s vector, raw and (``transform``) centred / whitened to ``whiten``.

    ``top1`` / ``top5`` are the served vector's accuracy; ``raw`` holds the L2-normalised one
    when a transform is applied. ``extract``: ``extract_features``' keywords."""
    t0 = time.perf_counter()
    model = pooled(backbone, pooling)
    train_f, train_l = extract_features(
        model, train_set, desc="k-NN train features", normalise=False, **extract
    )
    test_f, test_l = extract_features(
        model, test_set, desc="k-NN test features", normalise=False, **extract
    )
    raw = knn_classify(
        F.normalize(train_f, dim=1), train_l, F.normalize(test_f, dim=1), test_l, k, temperature
    )
    fitted = fit_transform(train_f, whiten) if transform or whiten else None
    result = dict(raw)
    if fitted is not None:
        served = knn_classify(fitted.apply(train_f), train_l, fitted.apply(test_f), test_l, k,
                              temperature)  # fmt: skip
        result = {**served, "raw": raw, "transform": fitted.kind, "served_dim": _dim(fitted)}
    result.update(
        pooling=pooling,
        k=k,
        temperature=temperature,
        n_train=len(train_f),
        n_test=len(test_f),
        seconds=round(time.perf_counter() - t0, 2),
        precision="bf16" if extract.get("bf16") else "fp32",
    )
    log.info(
        "k-NN (k=%d, T=%.2f, %s%s): top-1 %.2f%%, top-5 %.2f%% on %d test / %d train images%s "
        "(%.1f s)",
        k,
        temperature,
        pooling,
        f", {fitted.kind} to {_dim(fitted)} dims" if fitted else "",
        result["top1"],
        result["top5"],
        result["n_test"],
        result["n_train"],
        f"; raw {raw['top1']:.2f}%" if fitted else "",
        result["seconds"],
    )
    return result, fitted


def _dim(fitted: FittedTransform) -> int:
    return len(fitted.mean) if fitted.projection is None else fitted.projection.shape[1]
