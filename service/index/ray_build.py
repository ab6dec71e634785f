"""Bulk embedding on Ray: ``python -m service.index build --images DIR --ray [ADDRESS]``.

The sorted file list is cut into shards of ``--shard-size`` images. Ray worker actors each load
one engine (the server's own decoding, preprocessing and ``open_engine`` choice, through
``service.index.build.embed_files``) and embed whole shards; the driver writes each finished
shard to the configured index backend in one transaction (``store.add``), so a shard is either
fully indexed or not at all. A re-run skips every shard whose images are all indexed (and, in a
shard indexed only in part by an earlier plain build, the images already there): kill it at any
point, run it again, and every image is indexed exactly once.

Without ADDRESS Ray starts a local cluster on this machine, bound to 127.0.0.1; with one
(``ray://host:10001`` or ``auto``) the workers run on that cluster and must see the same paths
(a shared file system) and the model folder. Ray is an optional extra (``pip install '.[ray]'``),
imported only here.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.index.backend import IndexBackend
from service.index.build import BuildReport, FileEmbedder, find_images, item_id
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    number: int
    paths: tuple[str, ...]  # absolute paths, as the workers read them


class ShardEmbedder:
    """One engine per actor; ``embed`` turns a shard into (kept indices, vectors, thumbnails,
    failures), exactly as the single-process build does."""

    def __init__(self, model_dir: str, options: dict) -> None:
        from artifact import load_manifest
        from service.embedding_transform import load_transform
        from service.engine_choice import open_engine

        self.manifest = load_manifest(Path(model_dir))
        # The artifact's centring / whitening, as the server applies it to queries.
        self.transform = load_transform(Path(model_dir), self.manifest)
        self.options = options
        self.engine = open_engine(
            Path(model_dir),
            self.manifest,
            options["model_variant"],
            options["threads"],
            options["engine"],
            options["precision"],
        )

    def embed(self, shard: Shard, batch_size: int) -> tuple[int, list[int], np.ndarray, list, list]:
        kept: list[int] = []
        vectors, thumbs, failed = [], [], []
        paths = [Path(p) for p in shard.paths]
        embedder = FileEmbedder(self.manifest, self.engine, self.options["max_image_pixels"],
                                self.options["thumbnail_side"], self.transform)  # fmt: skip
        starts = list(range(0, len(paths), batch_size))
        ahead = embedder.prefetch(paths[:batch_size])
        for n, start in enumerate(starts):
            decoding = ahead
            if n + 1 < len(starts):  # the next batch decodes while this one runs
                ahead = embedder.prefetch(paths[starts[n + 1] : starts[n + 1] + batch_size])
            k, v, t, f = embedder(paths[start : start + batch_size], decoding)
            kept += [start + i for i in k]
            vectors.append(v)
            thumbs += t
            failed += f
        return shard.number, kept, np.concatenate(vectors), thumbs, failed


def plan_shards(
    root: Path, recursive: bool, shard_size: int
) -> tuple[list[Shard], dict[str, str], dict[str, str]]:
    """Shards over the sorted file list, with path -> relative path and path -> item id."""
    files = find_images(root, recursive)
    rel = {str(p): p.relative_to(root).as_posix() for p in files}
    ids = {p: item_id(r) for p, r in rel.items()}
    names = [str(p) for p in files]
    shards = [
        Shard(n, tuple(names[i : i + shard_size]))
        for n, i in enumerate(range(0, len(names), shard_size))
    ]
    return shards, rel, ids


def start_ray(address: str | None, workers: int) -> bool:
    """Connect to ``address``, or start a local cluster on loopback only; True if we started
    it (and so shut it down at the end)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: install it with `pip install '.[ray]'`") from None
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(
        num_cpus=workers,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",  # every Ray process listens on loopback only
        log_to_driver=False,
    )
    return True


def _results(shards: list[Shard], model_dir: Path, settings: Settings, workers: int, batch: int):
    import ray
    from ray.util import ActorPool

    options = {
        "model_variant": settings.model_variant,
        "engine": settings.engine,
        "precision": settings.precision,
        "threads": 1,  # one CPU per actor: Ray gives each actor one core
        "max_image_pixels": settings.max_image_pixels,
        "thumbnail_side": settings.thumbnail_side,
    }
    actor = ray.remote(num_cpus=1)(ShardEmbedder)
    pool = ActorPool([actor.remote(str(model_dir), options) for _ in range(workers)])
    yield from pool.map_unordered(lambda a, shard: a.embed.remote(shard, batch), shards)


def build_on_ray(
    store: IndexBackend,
    images: Path,
    model_dir: Path,
    settings: Settings,
    *,
    address: str | None = None,
    workers: int = 2,
    shard_size: int = 256,
    batch_size: int = 32,
    recursive: bool = False,
    metadata: dict[str, dict] | None = None,
    progress: bool = True,
) -> BuildReport:
    """Index every image under ``images`` not indexed yet, shard by shard, on Ray."""
    root = images.resolve()
    shards, rel, ids = plan_shards(root, recursive, shard_size)
    report = BuildReport(found=len(ids))
    done = store.existing(ids.values())
    todo = [
        Shard(s.number, tuple(p for p in s.paths if ids[p] not in done))
        for s in shards
        if any(ids[p] not in done for p in s.paths)
    ]
    report.skipped = len(done)
    log.info(
        "%d images in %d shards of %d: %d shards already written, %d to embed on Ray",
        len(ids), len(shards), shard_size, len(shards) - len(todo), len(todo),
    )  # fmt: skip
    if not todo:
        return report
    metadata = metadata or {}
    started = start_ray(address, workers)
    t0 = time.perf_counter()
    try:
        total = sum(len(s.paths) for s in todo)
        with tqdm(total=total, unit="img", desc="indexing on Ray", disable=not progress) as bar:
            for number, kept, vectors, thumbs, failed in _results(
                todo, model_dir, settings, workers, batch_size
            ):
                shard = next(s for s in todo if s.number == number)
                _write(store, shard, kept, vectors, thumbs, ids, rel, metadata)
                report.added += len(kept)
                report.failed += failed
                bar.update(len(shard.paths))
                log.info("shard %d written: %d images", number, len(kept))
    finally:
        if started:
            import ray

            ray.shutdown()
    rate = report.added / max(time.perf_counter() - t0, 1e-9)
    log.info("Ray build: %d images added at %.1f images/s", report.added, rate)
    return report


def _write(store, shard, kept, vectors, thumbs, ids, rel, metadata) -> None:
    """One shard, one transaction: all of its images are indexed, or none."""
    chosen = [shard.paths[i] for i in kept]
    if not chosen:
        return
    store.add(
        vectors,
        ids=[ids[p] for p in chosen],
        metadata=[metadata.get(rel[p], metadata.get(ids[p])) for p in chosen],
        sources=list(chosen),
        thumbnails=thumbs,
    )
