"""Row-wise cosine similarity and L2 normalisation (numpy)."""

from __future__ import annotations

import numpy as np

_EPS = 1e-12  # a zero row has cosine 0 with everything, and normalises to zeros


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows along the last axis, in float64: ``[..., D]`` pairs
    give ``[...]``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), _EPS)
    return (a * b).sum(axis=-1) / denom


def l2_normalise(rows: np.ndarray) -> np.ndarray:
    """Each row (last axis) scaled to unit length, in the input's dtype."""
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.maximum(norms, _EPS)
