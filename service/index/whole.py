"""Whole-index reads for analyses over every stored item (near-duplicate groups): the rows and
vectors of the embedded index at one version, and rows back to ids. Mixed into ``IndexStore``,
whose lock, database and FAISS index they read."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np


class WholeIndexReads:
    """Needs the host's ``_lock``, ``_db``, ``_ann``, ``_seq``, ``dim`` and ``_check_open``."""

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """(rows [n], unit vectors [n, dim], version) of every stored item, for whole-index
        analyses such as duplicate groups; ``version`` changes with every add and delete."""
        with self._lock:
            self._check_open()
            parts = list(self._db.iter_vectors(self.dim))
            version = self.version()
        if not parts:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32), version
        return (
            np.concatenate([r for r, _ in parts]),
            np.concatenate([v for _, v in parts]),
            version,
        )

    def version(self) -> tuple[int, int]:
        """(last row added, item count): changes with every add and delete."""
        with self._lock:
            return self._seq, self._ann.live

    def describe(self, rows: Sequence[int]) -> dict[int, tuple[str, dict]]:
        """row -> (id, metadata) for rows still stored."""
        with self._lock:
            found = self._db.describe_rows([int(r) for r in rows])
        return {r: (i, json.loads(m)) for r, (i, m) in found.items()}
