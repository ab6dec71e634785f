"""Search section: single-query latency (p50/p99), recall@10 against exact search, build time and
memory of the server's flat, HNSW and IVF indexes (``service.index.ann.AnnIndex`` with its
defaults, plus a sweep of the search-time knob) on clustered vectors; then the same through the
durable ``IndexStore`` and through a live server's GET /similar."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.common import Mode, percentiles
from benchmarks.vectors import Mixture, exact_top_k, recall_at_k

log = logging.getLogger(__name__)

DIM = 384
K = 10
SWEEP = {"hnsw": ("ef_search", (16, 32, 64, 128, 256)), "ivf": ("nprobe", (4, 8, 16, 32, 64))}


def _build(index_type: str, base: np.ndarray, threads: int):
    import faiss

    from service.index.ann import AnnIndex, AnnParams

    faiss.omp_set_num_threads(threads)
    ann = AnnIndex(DIM, AnnParams.make(index_type))
    t0 = time.perf_counter()
    step = 50_000
    for start in tqdm(range(0, len(base), step), desc=f"build {index_type}", leave=False):
        rows = np.arange(start, min(start + step, len(base)), dtype=np.int64)
        ann.add(rows, base[start : start + step])
    if ann.wants_training():
        ann.train_ivf()
    return ann, time.perf_counter() - t0


def _set_knob(ann, index_type: str, value: int) -> None:
    import faiss

    if index_type == "hnsw":
        faiss.downcast_index(ann.index.index).hnsw.efSearch = value
    elif index_type == "ivf" and ann.is_ivf:
        ann.index.nprobe = value


def _latency(search, queries: np.ndarray) -> tuple[list[list[int]], list[float]]:
    for q in queries[:20]:  # warm-up: caches and thread pools
        search(q[None, :])
    found, seconds = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = search(q[None, :])
        seconds.append(time.perf_counter() - t0)
        found.append(hits)
    return found, seconds


def _ivf_label(ann, in_effect: dict) -> str:
    if ann.params.index_type != "ivf":
        return ""
    return f"nlist={in_effect['nlist']} " if ann.is_ivf else "untrained (flat) "


def _index_rows(n: int, base: np.ndarray, queries: np.ndarray, truth, threads: int, mode: Mode):
    import faiss

    rows = []
    for index_type in ("flat", "hnsw", "ivf"):
        if index_type == "hnsw" and n >= 1_000_000 and mode.name != "full":
            continue
        ann, build_s = _build(index_type, base, threads)
        per_vector = len(faiss.serialize_index(ann.index)) / n
        knob, values = SWEEP.get(index_type, (None, (None,)))
        in_effect = ann.in_effect()  # the server's defaults (IVF: lists and probes chosen for n)
        # Flat is exact and scans everything: a few queries are enough to time it at 1M.
        qs = queries[:100] if index_type == "flat" and n >= 1_000_000 else queries
        for value in values:
            if knob:
                _set_knob(ann, index_type, value)
            found, secs = _latency(lambda q, a=ann: [r for r, _ in a.search(q, K)[0]], qs)
            default = knob is None or value == in_effect[knob]
            rows.append(
                {
                    "n": n,
                    "index": index_type + (" (default)" if default else ""),
                    "params": _ivf_label(ann, in_effect) + (f"{knob}={value}" if knob else "exact"),
                    "build_s": round(build_s, 1),
                    "recall_at_10": recall_at_k(found, truth[: len(qs)]),
                    **percentiles(secs),
                    "bytes_per_vector": round(per_vector, 1),
                    "gb_per_million": round(per_vector * 1e6 / 1e9, 3),
                    "queries": len(qs),
                }
            )
            log.info("search %s", rows[-1])
        del ann
    return rows


def _store_row(store, base, ids: list[str], queries, truth) -> dict:
    """Add ``base`` to the durable store in chunks, then time and score its searches."""
    n = len(base)
    t0 = time.perf_counter()
    for start in tqdm(range(0, n, 10_000), desc="store add", leave=False):
        store.add(base[start : start + 10_000], ids[start : start + 10_000])
    add_s = time.perf_counter() - t0
    found, secs = _latency(lambda q: [int(h.id[1:]) for h in store.search(q, K)[0]], queries)
    row = {"n": n, "index": "hnsw", "add_s": round(add_s, 1)}
    return row | {"recall_at_10": recall_at_k(found, truth), **percentiles(secs)}


def _similar_latencies(url: str, picked_ids: list[str]) -> list[float]:
    """Seconds per GET /similar for each id, after one untimed warm-up request."""
    import httpx

    secs = []
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/similar", params={"id": picked_ids[0], "k": K})
        for item_id in picked_ids:
            t0 = time.perf_counter()
            resp = client.get("/similar", params={"id": item_id, "k": K})
            secs.append(time.perf_counter() - t0)
            resp.raise_for_status()
    return secs


def _store_and_http(base, queries, truth, threads: int, mode: Mode) -> tuple[dict, dict]:
    """The durable store (SQLite lookups included) and GET /similar on a live server, HNSW."""
    from artifact import load_manifest
    from benchmarks.artifacts import model_dir, spec_for
    from benchmarks.server import Server
    from service.index import IndexStore

    folder = model_dir(spec_for("vit_small", mode.smoke), mode.cache)
    manifest = load_manifest(folder)
    n = len(base)
    ids = [f"v{i}" for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        data = Path(tmp) / "data"
        store = IndexStore.open(
            data, manifest.model_sha256, DIM, "hnsw", model_name=manifest.name, progress=False
        )
        store_row = _store_row(store, base, ids, queries, truth)
        store.close()
        picks = np.random.default_rng(1).choice(n, size=min(len(queries), 500), replace=False)
        with Server(folder.parent, folder.name, data, threads, index_type="hnsw") as server:
            secs = _similar_latencies(server.url, [ids[i] for i in picks])
            http_row = {"n": n, "index": "hnsw", "requests": len(picks)}
            http_row |= {"cold_start_s": round(server.cold_start_s, 2), **percentiles(secs)}
    return store_row, http_row


def run(mode: Mode, threads: int, so_far: dict) -> dict:
    out: dict = {"rows": [], "dim": DIM, "k": K}
    for n in mode.search_sizes:
        mix = Mixture(DIM, clusters=max(10, n // 100))
        base = mix.sample(n, seed=1)
        queries = mix.sample(mode.search_queries, seed=2)
        truth = exact_top_k(base, queries, K)
        out["rows"] += _index_rows(n, base, queries, truth, threads, mode)
        if n == mode.search_sizes[0]:
            out["store"], out["http"] = _store_and_http(base, queries, truth, threads, mode)
    return out
