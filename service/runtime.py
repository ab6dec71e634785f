"""What a running server holds: settings, manifest, engine, batcher, index store, metrics.

Kept apart from the FastAPI app so routes, tests and the CLI share one way to start and stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import numpy as np

from service.batcher import MicroBatcher
from service.embedding_transform import (
    EmbeddingTransform,
    load_transform,
    served_vectors,
    transform_key,
)
from service.engine import Engine, model_file
from service.engines import open_engine
from service.index import (
    IndexModelMismatch,
    IndexStore,
    IndexStoreError,
    read_info,
    rebuild_command,
)
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
    transform: EmbeddingTransform | None = None  # centring / whitening from the artifact
    model_ready: bool = False  # /embed, /attention, /models can answer
    ready: bool = False  # and the index is open: everything can answer
    index_error: str | None = None
    _store_task: asyncio.Task | None = None
    _started: float = 0.0

    @property
    def attention_max_side(self) -> int:
        assert self.manifest is not None
        return attention_max_side(self.settings, self.manifest.patch_size or 16)

    @property
    def embed_dim(self) -> int:
        """The dimension of served (and indexed) vectors: the transform's output, if any."""
        assert self.manifest is not None
        return self.transform.info.output_dim if self.transform else self.manifest.embed_dim

    def vectors(self, raw: np.ndarray) -> np.ndarray:
        """Raw CLS embeddings -> the unit vectors the index stores and searches."""
        return served_vectors(self.transform, raw)

    @property
    def served_file(self) -> str:
        assert self.manifest is not None
        return model_file(self.manifest, self.settings.model_variant)

    async def start(self) -> None:
        """Load the model and check the index belongs to it (raising, so the process stops,
        when either cannot be served), then open and replay the index in the background:
        /embed and /attention work at once, readiness and the index routes wait for it."""
        self._started = time.perf_counter()
        s = self.settings
        self.model_dir = find_model_dir(s)
        self.manifest = await anyio.to_thread.run_sync(load_manifest, self.model_dir)
        self.transform = await anyio.to_thread.run_sync(
            load_transform, self.model_dir, self.manifest
        )
        self.engine = await anyio.to_thread.run_sync(
            open_engine,
            self.model_dir,
            self.manifest,
            s.model_variant,
            s.threads,
            s.engine,
            s.precision,
            s.engine_streams,
        )
        await anyio.to_thread.run_sync(self._check_index_model)
        self.batcher = MicroBatcher(
            self.engine, s.max_batch, s.batch_wait_ms, s.queue_limit, self.metrics, s.retry_after_s
        )
        self.batcher.start()
        self.metrics.gauge("dino_queue_depth", "images waiting for the model", self._depth)
        self.metrics.gauge("dino_index_items", "items in the index", self.index_size)
        self.model_ready = True
        log.info(
            "loaded model %s (%s, %s, sha256 %s) from %s; opening the %s index in %s",
            self.manifest.name,
            self.manifest.arch,
            s.model_variant,
            self.manifest.model_sha256,
            self.model_dir,
            s.index_type,
            s.data_dir,
        )
        self._store_task = asyncio.get_running_loop().create_task(self._load_store())

    def _check_index_model(self) -> None:
        """Refuse, before any replay, a data dir whose vectors come from another model."""
        assert self.manifest is not None
        try:
            info = read_info(self.settings.data_dir)
        except IndexStoreError:
            return  # no index yet: it will be created for this model
        sha, dim = info.get("model_sha256"), info.get("dim")
        if sha is None or (sha == self.manifest.model_sha256 and dim == self.embed_dim):
            self._check_index_transform(info.get("embedding_transform"))
            return
        built_by = info.get("model_name") or "an unnamed model"
        raise IndexModelMismatch(
            f"the index in {self.settings.data_dir} was built by model {built_by!r} (sha256 "
            f"{sha[:12]}, dim {dim}), but DINO_MODEL serves {self.manifest.name!r} (sha256 "
            f"{self.manifest.model_sha256[:12]}, dim {self.embed_dim}); their vectors "
            f"cannot be compared. Re-embed the items with this model: "
            f"`{rebuild_command(self.settings.data_dir)}`, point DINO_DATA_DIR elsewhere, "
            "or serve the model that built it."
        )

    def _check_index_transform(self, recorded: str | None) -> None:
        """Same weights, but vectors made with another (or no) centring cannot be mixed."""
        mine = transform_key(self.transform)
        if recorded is None or recorded == mine:
            return
        raise IndexModelMismatch(
            f"the index in {self.settings.data_dir} holds vectors made with embedding transform "
            f"{recorded!r}, but model {self.manifest.name!r} applies {mine!r}; scores would not "
            f"be comparable. Re-embed the items: `{rebuild_command(self.settings.data_dir)}`, "
            "or point DINO_DATA_DIR elsewhere."
        )

    async def _load_store(self) -> None:
        try:
            self.store = await anyio.to_thread.run_sync(self._open_store)
        except Exception as exc:  # readiness stays false and says why; /embed keeps working
            self.index_error = f"cannot open the index in {self.settings.data_dir}: {exc}"
            log.error("%s", self.index_error)
            return
        self.ready = True
        log.info(
            "serving model %s (sha256 %s); index %s: %d items; ready in %.2f s",
            self.manifest.name if self.manifest else "?",
            self.manifest.model_sha256 if self.manifest else "?",
            self.settings.data_dir,
            self.index_size(),
            time.perf_counter() - self._started,
        )

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the index is open (for tests and tools); raises if it cannot be."""
        with anyio.fail_after(timeout):
            while not self.ready:
                if self.index_error:
                    raise IndexStoreError(self.index_error)
                await anyio.sleep(0.01)

    def _open_store(self) -> IndexStore:
        assert self.manifest is not None
        return IndexStore.open(
            self.settings.data_dir,
            model_sha256=self.manifest.model_sha256,
            dim=self.embed_dim,
            index_type=self.settings.index_type,
            model_name=self.manifest.name,
            transform=transform_key(self.transform),
            **self.settings.index_params,
        )

    async def stop(self) -> None:
        self.ready = self.model_ready = False
        if self._store_task is not None and not self._store_task.done():
            # Still replaying: abandon it (everything acknowledged is in SQLite already).
            self._store_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._store_task
        if self.batcher is not None:
            await self.batcher.stop()
        if self.store is not None:
            await anyio.to_thread.run_sync(self.store.close)

    def _depth(self) -> float:
        return self.batcher.depth if self.batcher else 0

    def index_size(self) -> int:
        if self.store is None:
            raise IndexStoreError("the index is not open yet")
        return len(self.store)
