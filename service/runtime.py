"""What a running server holds: settings, manifest, engine, decoder, batcher, index store, metrics.

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

from artifact import ArtifactError, Manifest, load_manifest
from artifact.decoder import DecoderMeta, DecoderUnavailable, load_decoder_meta
from service.batcher import MicroBatcher
from service.embedding_transform import (
    EmbeddingTransform,
    load_transform,
    served_vectors,
    transform_key,
)
from service.engine_choice import OPENVINO_CACHE, Engine, model_file, open_graph, openvino_cache
from service.engine_measure import Choice, choose_engine
from service.images import PixelBudget
from service.index import (
    IndexModelMismatch,
    IndexStoreError,
    factory,
    read_info,
    rebuild_command,
)
from service.index.backend import IndexBackend
from service.index.lock import DataDirBusy
from service.metrics import Metrics
from service.settings import Settings, SettingsError, attention_max_side, find_model_dir

log = logging.getLogger("service")
LOCK_RETRY_S = 0.5  # another process holds the data folder: try its lock again this often
DB_RETRY_S = 5  # a shared index database unreachable at start: try again this often


class NotReady(RuntimeError):
    """A part the request needs is not loaded (yet, or any more): answered as a 503."""


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    model_dir: Path | None = None
    manifest: Manifest | None = None
    engine: Engine | None = None
    choice: Choice | None = None  # which engine/precision/file is served, and why
    engine_open_s: float | None = None  # choosing (measuring, if not cached) and opening it
    decoder: Engine | None = None  # decoder.onnx beside the model, when there is a usable one
    decoder_meta: DecoderMeta | None = None
    decoder_error: str = ""  # why there is no decoder: what /reconstruct answers (409)
    batcher: MicroBatcher | None = None
    store: IndexBackend | None = None
    transform: EmbeddingTransform | None = None  # centring / whitening from the artifact
    model_ready: bool = False  # /embed, /attention, /models can answer
    ready: bool = False  # and the index is open: everything can answer
    index_error: str | None = None
    index_waiting: str | None = None  # another process holds the data dir: retrying
    decode_budget: PixelBudget = field(init=False)
    _store_task: asyncio.Task | None = None
    _started: float = 0.0

    def __post_init__(self) -> None:
        self.decode_budget = PixelBudget(self.settings.max_decode_pixels)

    # Real checks, not asserts: they must hold under ``python -O`` too.
    def loaded_manifest(self) -> Manifest:
        if self.manifest is None:
            raise NotReady("not ready: the model is not loaded")
        return self.manifest

    def model_parts(self) -> tuple[Manifest, MicroBatcher]:
        """The manifest and the batcher, or NotReady."""
        if self.batcher is None:
            raise NotReady("not ready: the model is not loaded")
        return self.loaded_manifest(), self.batcher

    def open_index(self) -> IndexBackend:
        """The index store, or NotReady."""
        if self.store is None:
            raise NotReady("not ready: the index is not open")
        return self.store

    @property
    def attention_max_side(self) -> int:
        return attention_max_side(self.settings, self.loaded_manifest().patch_size or 16)

    @property
    def embed_dim(self) -> int:
        """The dimension of served (and indexed) vectors: the transform's output, if any."""
        embed_dim = self.loaded_manifest().embedding_dim
        return self.transform.info.output_dim if self.transform else embed_dim

    def vectors(self, raw: np.ndarray) -> np.ndarray:
        """Raw CLS embeddings -> the unit vectors the index stores and searches."""
        return served_vectors(self.transform, raw)

    @property
    def served_file(self) -> str:
        return model_file(self.loaded_manifest(), self.served_variant)

    @property
    def served_variant(self) -> str:
        return self.choice.candidate.variant if self.choice else "fp32"

    async def start(self) -> None:
        """Load the model and check the index belongs to it (raising, so the process stops,
        when either cannot be served), then open and replay the index in the background:
        /embed and /attention work at once, readiness and the index routes wait for it."""
        self._started = time.perf_counter()
        s = self.settings
        self.model_dir = find_model_dir(s)
        try:
            factory.check_url(s)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        self.manifest = await anyio.to_thread.run_sync(load_manifest, self.model_dir)
        self.transform = await anyio.to_thread.run_sync(
            load_transform, self.model_dir, self.manifest
        )
        t0 = time.perf_counter()
        self.choice, self.engine = await anyio.to_thread.run_sync(
            choose_engine, self.model_dir, self.manifest, s
        )
        self.engine_open_s = time.perf_counter() - t0
        await anyio.to_thread.run_sync(self._open_decoder)
        await anyio.to_thread.run_sync(self._check_index_model)
        self.batcher = MicroBatcher(
            self.engine, s.max_batch, s.batch_wait_ms, s.queue_limit, self.metrics, s.retry_after_s
        )
        self.batcher.start()
        self.metrics.gauge("dino_queue_depth", "images waiting for the model", self._depth)
        self.metrics.gauge("dino_index_items", "items in the index", self._gauge_size)
        self.model_ready = True
        log.info(
            "loaded model %s (%s, %s, sha256 %s) from %s; opening the %s index at %s",
            self.manifest.name,
            self.manifest.arch,
            self.served_variant,
            self.manifest.model_sha256,
            self.model_dir,
            "pgvector" if factory.shared(s) else s.index_type,
            factory.location(s),
        )
        self._store_task = asyncio.get_running_loop().create_task(self._load_store())

    def _open_decoder(self) -> None:
        """Open ``decoder.onnx`` once, with the model's engine choice. A missing or unusable
        decoder does not stop the server: ``decoder_error`` says why, and ``/reconstruct``
        answers it as a 409."""
        manifest, model_dir, s = self.manifest, self.model_dir, self.settings
        if manifest is None or model_dir is None:
            raise RuntimeError("the decoder is opened after the model")
        if "patch_tokens" not in manifest.outputs:
            self.decoder_error = f"model {manifest.name!r} ({manifest.arch}) has no patch tokens"
            return
        try:
            meta = load_decoder_meta(model_dir, manifest)
            # The model's engine; the decoder has one file, run at the model's float precision.
            c = self.choice.candidate if self.choice else None
            engine, precision = (c.engine, c.engine_precision) if c else (s.engine, "auto")
            cache = openvino_cache(Path(s.data_dir) / OPENVINO_CACHE, manifest)
            decoder = open_graph(
                model_dir / meta.file, meta.input, s.threads, engine, precision, cache_dir=cache
            )
            if meta.output not in decoder.output_names:
                raise DecoderUnavailable(
                    f"{model_dir / meta.file} has outputs {decoder.output_names}, decoder.json "
                    f"says {meta.output!r}; re-run `python -m training.invert`"
                )
        except ArtifactError as exc:  # DecoderUnavailable, or the engine cannot load the file
            self.decoder_error = str(exc)
            log.log(
                logging.INFO if "has no decoder" in self.decoder_error else logging.WARNING,
                "no /reconstruct: %s",
                self.decoder_error,
            )
            return
        self.decoder, self.decoder_meta = decoder, meta
        log.info("loaded decoder %s", model_dir / meta.file)

    def _check_index_model(self) -> None:
        """Refuse, before any replay, a data dir whose vectors come from another model."""
        manifest = self.loaded_manifest()
        if factory.shared(self.settings):
            self._first_connect()
            return
        try:
            info = read_info(self.settings.data_dir)
        except IndexStoreError:
            return  # no index yet: it will be created for this model
        sha, dim = info.get("model_sha256"), info.get("dim")
        if sha is None or (sha == manifest.model_sha256 and dim == self.embed_dim):
            self._check_index_transform(info.get("embedding_transform"))
            return
        built_by = info.get("model_name") or "an unnamed model"
        raise IndexModelMismatch(
            f"the index in {self.settings.data_dir} was built by model {built_by!r} (sha256 "
            f"{sha[:12]}, dim {dim}), but DINO_MODEL serves {manifest.name!r} (sha256 "
            f"{manifest.model_sha256[:12]}, dim {self.embed_dim}); their vectors "
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
            f"{recorded!r}, but model {self.loaded_manifest().name!r} applies {mine!r}; scores "
            "would not be comparable. Re-embed the items: "
            f"`{rebuild_command(self.settings.data_dir)}`, or point DINO_DATA_DIR elsewhere."
        )

    def _first_connect(self) -> None:
        """A shared database: open it now, so another model's table stops the process; an
        unreachable one is retried in the background while /embed serves."""
        from service.index.pg_pool import IndexUnavailable

        try:
            self.store = self._open_store()
        except IndexUnavailable as exc:
            self.index_error = f"{exc}; retrying every {DB_RETRY_S} s"
            log.error("%s", self.index_error)

    async def _load_store(self) -> None:
        while self.store is None:
            try:
                self.store = await anyio.to_thread.run_sync(self._open_store)
            except DataDirBusy as exc:  # becomes ready once the holder exits
                if self.index_waiting is None:
                    log.warning("%s; retrying every %.1f s", exc, LOCK_RETRY_S)
                self.index_waiting = f"waiting for the data folder lock (held by pid {exc.holder})"
                await anyio.sleep(LOCK_RETRY_S)
            except Exception as exc:  # readiness stays false and says why; /embed keeps working
                where = factory.location(self.settings)
                self.index_error = f"cannot open the index at {where}: {exc}"
                if factory.shared(self.settings) and not isinstance(exc, IndexModelMismatch):
                    self.index_error += f"; retrying every {DB_RETRY_S} s"
                    log.error("%s", self.index_error)
                    await anyio.sleep(DB_RETRY_S)
                    continue
                log.error("%s", self.index_error)
                return
        self.index_waiting = None
        self.index_error = None
        self.ready = True
        log.info(
            "serving model %s (sha256 %s); index %s: %d items; ready in %.2f s (engine "
            "chosen and opened in %.2f s)",
            self.manifest.name if self.manifest else "?",
            self.manifest.model_sha256 if self.manifest else "?",
            factory.location(self.settings),
            self.index_size(),
            time.perf_counter() - self._started,
            self.engine_open_s or 0.0,
        )

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the index is open (for tests and tools); raises if it cannot be."""
        with anyio.fail_after(timeout):
            while not self.ready:
                if self.index_error:
                    raise IndexStoreError(self.index_error)
                await anyio.sleep(0.01)

    def _open_store(self) -> IndexBackend:
        m = self.loaded_manifest()
        return factory.open_index(
            self.settings,
            m.model_sha256,
            self.embed_dim,
            m.name,
            transform=transform_key(self.transform),
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

    def _gauge_size(self) -> int:
        """For /metrics: never a database round trip on the event loop."""
        cached = getattr(self.store, "cached_len", None)
        return cached if cached is not None else self.index_size()
