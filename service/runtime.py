"""What a running server holds: settings, manifest, engine, batcher, index store, metrics.

Kept apart from the FastAPI app so routes, tests and the CLI share one way to start and stop it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from service.batcher import MicroBatcher
from service.engine import Engine, load_engine, model_file
from service.index import IndexStore
from service.manifest import Manifest, load_manifest
from service.metrics import Metrics
from service.settings import Settings, attention_max_side, find_model_dir

log = logging.getLogger("service")


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    model_dir: Path | None = None
    manifest: Manifest | None = None
    engine: Engine | None = None
    batcher: MicroBatcher | None = None
    store: IndexStore | None = None
    ready: bool = False

    @property
    def attention_max_side(self) -> int:
        assert self.manifest is not None
        return attention_max_side(self.settings, self.manifest.patch_size or 16)

    @property
    def served_file(self) -> str:
        assert self.manifest is not None
        return model_file(self.manifest, self.settings.model_variant)

    async def start(self) -> None:
        """Load the model and open (and if needed replay) the index; raise with a clear message
        when either cannot be served, so the process stops instead of serving wrong vectors."""
        started = time.perf_counter()
        s = self.settings
        self.model_dir = find_model_dir(s)
        self.manifest = await anyio.to_thread.run_sync(load_manifest, self.model_dir)
        self.engine = await anyio.to_thread.run_sync(
            load_engine, self.model_dir, self.manifest, s.model_variant, s.threads
        )
        self.batcher = MicroBatcher(
            self.engine, s.max_batch, s.batch_wait_ms, s.queue_limit, self.metrics, s.retry_after_s
        )
        self.batcher.start()
        self.store = await anyio.to_thread.run_sync(self._open_store)
        self.metrics.gauge("dino_queue_depth", "images waiting for the model", self._depth)
        self.metrics.gauge("dino_index_items", "items in the index", self.index_size)
        self.ready = True
        log.info(
            "serving model %s (%s, %s, sha256 %s) from %s; index %s at %s: %d items; "
            "ready in %.2f s",
            self.manifest.name,
            self.manifest.arch,
            s.model_variant,
            self.manifest.model_sha256,
            self.model_dir,
            s.index_type,
            s.data_dir,
            self.index_size(),
            time.perf_counter() - started,
        )

    def _open_store(self) -> IndexStore:
        assert self.manifest is not None
        return IndexStore.open(
            self.settings.data_dir,
            model_sha256=self.manifest.model_sha256,
            dim=self.manifest.embed_dim,
            index_type=self.settings.index_type,
            model_name=self.manifest.name,
        )

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop()
        if self.store is not None:
            await anyio.to_thread.run_sync(self.store.close)

    def _depth(self) -> float:
        return self.batcher.depth if self.batcher else 0

    def index_size(self) -> int:
        assert self.store is not None
        return len(self.store)
