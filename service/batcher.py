"""An asyncio micro-batcher in front of the engine.

Requests enqueue one job per image and await their futures. A dispatcher task takes the oldest job,
waits up to ``wait_ms`` (from that job's arrival) for up to ``max_batch`` jobs of the same input
shape and outputs, runs them as one call in a dedicated thread (the event loop stays free), and
hands each job its own rows. An engine with ``parallel_calls`` > 1 (OpenVINO with several streams)
gets that many batches in flight at once, each in its own thread; otherwise one at a time.
When the engine is idle and nothing else waits, a batch goes at once (waiting for company only
adds latency: while the engine is busy the next batch fills by itself), and on such an engine it
runs on all threads (``run_solo``) with the other slots held, so a lone client is not served by
one stream's share of the cores. The queue is bounded in images: a request that would overflow
it is refused at once with ``Overloaded`` (503 + Retry-After) instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.engine_choice import Engine
from service.metrics import Metrics

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The server is busy (queue full, or the decoding budget spent); the client should retry
    after ``retry_after`` seconds (DINO_RETRY_AFTER_S)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Job:
    pixels: np.ndarray
    outputs: tuple[str, ...]
    future: asyncio.Future
    enqueued: float
    key: tuple = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.pixels.shape, self.outputs)


class MicroBatcher:
    def __init__(
        self,
        engine: Engine,
        max_batch: int,
        wait_ms: float,
        queue_limit: int,
        metrics: Metrics | None = None,
        retry_after: int = 1,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.queue_limit = queue_limit
        self.metrics = metrics
        self.retry_after = retry_after
        self._queue: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        # One thread per call the engine can run at once: an onnxruntime session already uses
        # every intra-op thread (two calls would fight); OpenVINO streams split the cores.
        self.parallel = max(1, int(getattr(engine, "parallel_calls", 1)))
        self._executor = ThreadPoolExecutor(
            max_workers=self.parallel, thread_name_prefix="inference"
        )
        self._slots = asyncio.Semaphore(self.parallel)
        # An engine that splits its threads into streams may run a lone batch on all of them.
        self._solo = getattr(engine, "run_solo", None) if self.parallel > 1 else None
        self._running: set[asyncio.Task] = set()
        # Images in the last batch dispatched; until a lone one is seen, batches wait as usual.
        self._last_size = max_batch
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Images waiting (not yet handed to the engine)."""
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name="micro-batcher")

    async def stop(self) -> None:
        for task in [self._task, *self._running]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        _fail(list(self._queue), RuntimeError("server is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    async def infer(
        self, images: list[np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        """Run ``images`` (each ``[3,H,W]``); returns ``{output: [len(images), ...]}`` in order."""
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        # An oversized single request is still admitted into an empty queue, so it can never
        # starve; max_images_per_request bounds that case.
        if self._queue and len(self._queue) + len(images) > self.queue_limit:
            if self.metrics:
                self.metrics.rejected.inc()
            raise Overloaded(
                f"server busy: {len(self._queue)} images queued (limit {self.queue_limit}); "
                f"retry in {self.retry_after} s",
                self.retry_after,
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        jobs = [_Job(px, outputs, loop.create_future(), now) for px in images]
        self._queue.extend(jobs)
        self._wakeup.set()
        rows = await asyncio.gather(*(job.future for job in jobs))
        return {name: np.stack([row[name] for row in rows]) for name in outputs}

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # a free engine slot first: the batch forms meanwhile
            try:
                batch = await self._next_batch(loop)
            except BaseException:
                self._slots.release()
                raise
            self._last_size = len(batch)
            slots = 1
            if self._solo is not None and not self._running and not self._queue:
                # Alone: hold every slot (all free, nothing runs) and use all threads.
                for _ in range(self.parallel - 1):
                    await self._slots.acquire()
                slots = self.parallel
            task = loop.create_task(self._run(batch, slots))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Job]:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._queue[0]
            # The engine idle and the last batch a lone image (one client at a time): waiting
            # would only add latency. Otherwise wait: clients answered together come back
            # together, and a batch dispatched on the first of them would split the next one.
            alone = not self._running and self._last_size <= 1
            deadline = first.enqueued + (0.0 if alone else self.wait_s)
            while self._matching(first.key) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take(first.key)
            if batch:
                return batch

    async def _run(self, batch: list[_Job], slots: int = 1) -> None:
        try:
            await self._execute(batch, solo=slots > 1)
        except asyncio.CancelledError:  # stop() while this batch was in the engine
            _fail(batch, RuntimeError("server is shutting down"))
            raise
        except Exception as exc:  # never let one bad batch stop the worker for everyone
            log.exception("batch of %d failed", len(batch))
            _fail(batch, exc)
        finally:
            for _ in range(slots):
                self._slots.release()

    def _matching(self, key: tuple) -> int:
        return sum(1 for job in self._queue if job.key == key)

    def _take(self, key: tuple) -> list[_Job]:
        """Pop up to max_batch live jobs with ``key``; others keep their place in the queue."""
        batch: list[_Job] = []
        keep: deque[_Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            if job.future.done():  # the caller went away (cancelled); drop its work
                continue
            if job.key == key and len(batch) < self.max_batch:
                batch.append(job)
            else:
                keep.append(job)
        self._queue = keep
        return batch

    async def _execute(self, batch: list[_Job], solo: bool = False) -> None:
        outputs = batch[0].outputs
        pixels = np.stack([job.pixels for job in batch])
        started = time.perf_counter()
        run = self._solo if solo and self._solo is not None else self.engine.run
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor, run, pixels, outputs
            )
        except Exception as exc:
            log.exception("inference failed for a batch of %d", len(batch))
            _fail(batch, exc)
            return
        if self.metrics:
            kind = "embed" if outputs == ("embedding",) else "+".join(outputs)
            self.metrics.batch_size.labels(kind).observe(len(batch))
            self.metrics.inference.observe(time.perf_counter() - started)
            self.metrics.images.inc(len(batch))
        for i, job in enumerate(batch):
            if not job.future.done():
                job.future.set_result({name: result[name][i] for name in outputs})


def _fail(jobs: list[_Job], exc: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)
