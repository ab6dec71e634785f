"""IVF lists chosen from the number of vectors (real FAISS, small n): at training, kept across a
restart, retrained at open once outgrown, and still overridable with an explicit ``nlist``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from service.index import IndexStore
from service.index.ann import AUTO_TRAIN_MIN, AnnParams, auto_nlist, auto_nprobe
from service.index.snapshot import SNAPSHOT_FILE, read_snapshot

SHA, DIM = "c" * 64, 16


def vectors(n: int, seed: int) -> np.ndarray:
    """Clustered unit vectors (40 centres), as embeddings are."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((40, DIM))
    x = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def open_ivf(path: Path, **params: object) -> IndexStore:
    return IndexStore.open(path, SHA, DIM, "ivf", progress=False, **params)


def test_auto_nlist_follows_faiss_guidance():
    assert [auto_nlist(n) for n in (10_000, 100_000, 1_000_000)] == [256, 1024, 4096]
    for n in (50, 400, 1_000, 9_984, 30_000, 250_000, 3_000_000, 50_000_000):
        nlist = auto_nlist(n)
        assert nlist & (nlist - 1) == 0  # a power of two
        assert 39 * nlist <= n  # enough points to train every list
        if n >= 25_000:  # not limited by the points: within a factor sqrt(2) of 4 sqrt(n)
            assert 4 * math.sqrt(n) / 1.5 <= nlist <= 4 * math.sqrt(n) * 1.5
    assert auto_nlist(10) == 1
    assert [auto_nprobe(n) for n in (8, 256, 1024, 4096, 16384)] == [8, 16, 16, 64, 256]


def test_params_default_to_auto_and_validate():
    p = AnnParams.make("ivf")
    assert (p.nlist, p.nprobe, p.train_min) == (None, None, AUTO_TRAIN_MIN)
    assert p.build_key() == {"index_type": "ivf", "nlist": "auto", "pq_m": None}
    assert p.in_effect() == {"nlist": "auto", "pq_m": None, "nprobe": "auto", "train_min": 9984}
    given = AnnParams.make("ivf", nlist=64, nprobe=8)
    assert (given.train_min, given.build_key()["nlist"]) == (39 * 64, 64)
    with pytest.raises(ValueError, match="nlist must be >= 1"):
        AnnParams.make("ivf", nlist=0)


def test_lists_are_chosen_at_training_and_kept_across_restarts(tmp_path: Path):
    path = tmp_path / "ivf"
    with open_ivf(path, train_min=400) as store:
        store.add(vectors(399, 0))
        assert store.stats()["trained"] is False
        assert store.stats()["params"]["nlist"] == "auto"
        store.add(vectors(1, 1))  # the 400th vector trains it: 400 // 39 caps the lists at 8
        stats = store.stats()
        assert stats["trained"] is True
        assert (stats["params"]["nlist"], stats["params"]["nprobe"]) == (8, 8)
        store.add(vectors(300, 2))  # 700 vectors would now get 16 lists; the live index keeps 8
        assert store.stats()["params"]["nlist"] == 8
    header, _ = read_snapshot(path / SNAPSHOT_FILE)
    assert header["build"] == {"index_type": "ivf", "nlist": "auto", "pq_m": None}
    with open_ivf(path, train_min=400) as store:  # the snapshot is used as is: still 8 lists
        assert len(store) == 700 and store.stats()["params"]["nlist"] == 8
        assert store.stats()["pending_since_snapshot"] == 0
        more = vectors(700, 3)
        store.add(more)  # 1,400 vectors: auto_nlist is 32 = 4 x 8
        probe = more[0]
    with open_ivf(path, train_min=400) as store:  # outgrown: retrained while opening
        stats = store.stats()
        assert len(store) == 1400 and stats["trained"] is True
        assert stats["params"]["nlist"] == auto_nlist(1400) == 32
        assert store.search(probe, k=1)[0][0].score == pytest.approx(1.0, abs=1e-5)
    with open_ivf(path, train_min=400) as store:  # and the retrained lists are the ones kept
        assert store.stats()["params"]["nlist"] == 32
        assert store.stats()["pending_since_snapshot"] == 0


def test_an_explicit_nlist_overrides_and_switching_rebuilds(tmp_path: Path):
    path = tmp_path / "ivf"
    with open_ivf(path, nlist=4, nprobe=2) as store:  # train_min 39 * 4
        store.add(vectors(1400, 0))
        assert store.stats()["params"] == {
            "nlist": 4, "pq_m": None, "nprobe": 2, "train_min": 156,
        }  # fmt: skip
    with open_ivf(path, nlist=4, nprobe=2) as store:  # given lists are never "outgrown"
        assert store.stats()["params"]["nlist"] == 4
    with open_ivf(path, train_min=400) as store:  # back to auto: another build, lists for n
        assert store.stats()["params"]["nlist"] == auto_nlist(1400) == 32
        hits = store.search(vectors(5, 0), k=3)
        assert all(len(h) == 3 for h in hits)
