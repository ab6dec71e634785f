"""Clustered test vectors for the search section: a Gaussian mixture on the unit sphere in 384-d
with unequal cluster sizes. Uniform noise would make every approximate index look broken (no
neighbourhood structure); real embeddings cluster, and so does this."""

from __future__ import annotations

import numpy as np


class Mixture:
    def __init__(self, dim: int, clusters: int, spread: float = 1.0, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        # Zipf-like sizes: a few big classes, a long tail of small ones.
        weights = 1.0 / np.arange(1, clusters + 1) ** 0.7
        self.weights = weights / weights.sum()
        # spread 1.0: a point's cosine to its centre is ~0.7, like same-class image embeddings.
        self.noise = spread / np.sqrt(dim)
        self.dim = dim

    def sample(self, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
        """``n`` unit float32 vectors (generated in chunks to bound the float64 temporaries)."""
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            which = rng.choice(len(self.centres), size=m, p=self.weights)
            x = self.centres[which] + self.noise * rng.standard_normal((m, self.dim), np.float32)
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index.search(queries, k)[1]


def recall_at_k(found: list[list[int]], truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = [len(set(f[:k]) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k)
