"""An OpenVINO engine: reads the same ``model.onnx`` as onnxruntime and runs it on the CPU plugin.

Why: onnxruntime's CPU provider runs this ViT in fp32 only, which leaves the AMX/AVX-512-BF16
matrix units idle. OpenVINO with ``INFERENCE_PRECISION_HINT=bf16`` computes the matrix products in
bf16 (fp32 accumulation) and keeps the same artifact, inputs and outputs. On a CPU without native
bf16 the plugin cannot honour the hint; we then ask for f32 explicitly and log it, so the server
still runs (at onnxruntime-like speed) instead of failing.

Same small interface as ``service.engine_onnxruntime.OrtEngine``: ``input_name``, ``output_names``,
``run(pixels, outputs) -> {name: array}``. openvino is an optional dependency (extra ``fast``).
"""

from __future__ import annotations

import functools
import logging
import queue
from pathlib import Path

import numpy as np

from artifact import ArtifactError

log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp32")
_OV_TYPES = {"bf16": "bf16", "fp32": "f32"}


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_supports_bf16() -> bool:
    """Whether OpenVINO's CPU plugin reports native bf16 (AVX-512-BF16 or AMX) on this CPU."""
    return "BF16" in shared_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@functools.cache
def shared_core():
    """The process's one ``openvino.Core``, created on first use and never released.

    Why one, kept for good: each Core's CPU plugin installs an alternate signal stack (mmap) on the
    thread that first uses it and unmaps it when the plugin is destroyed, restoring the previous
    stack only if that thread is the one destroying it and only in LIFO order. A Core dropped on
    another thread, or two Cores dropped out of order, leave that thread's alternate stack pointing
    at unmapped memory, and the next Python-handled signal there (SIGTERM from uvicorn's handler,
    SIGCHLD from PyTorch's DataLoader) kills the process with SIGSEGV (openvino 2026.4,
    replayed in tests/test_openvino_signals.py). A single Core that lives as long as the process
    never unmaps its stack; every compiled model comes from it.
    """
    try:
        import openvino as ov
    except ImportError as exc:
        raise ArtifactError(
            "DINO_ENGINE=openvino needs the openvino package: pip install '.[fast]' "
            "(or set DINO_ENGINE=onnxruntime)"
        ) from exc
    return ov.Core()


def usable_cache_dir(cache_dir: Path | None) -> Path | None:
    """``cache_dir``, created, or ``None`` (no cache, one warning) when it cannot be."""
    if cache_dir is None:
        return None
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only data folder: every start compiles, nothing worse
        log.warning("OpenVINO: no compiled-model cache (%s); every start compiles", exc)
        return None
    return Path(cache_dir)


def _compile_config(precision: str, threads: int, streams: int) -> dict[str, object]:
    config: dict[str, object] = {
        "INFERENCE_PRECISION_HINT": _OV_TYPES[precision],
        "INFERENCE_NUM_THREADS": int(threads),
        # LATENCY: all threads on one request; THROUGHPUT with NUM_STREAMS: the threads split
        # into streams that each run their own request.
        "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
    }
    if streams > 1:
        config["NUM_STREAMS"] = streams
    return config


def _loaded_from_cache(compiled) -> bool:
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except Exception:  # noqa: BLE001 - a plugin without the property: report a compile
        return False


class OpenVinoEngine:
    """One compiled model on the CPU plugin with ``threads`` inference threads.

    ``precision`` is the inference precision of the matrix products: ``bf16`` (falls back to
    ``fp32`` with a warning when the CPU lacks bf16) or ``fp32``. ``streams`` > 1 splits the
    threads into that many streams that each run a whole batch (``parallel_calls`` of ``run`` at
    once): no thread waits on another inside a layer, which on 2 cores shared with JPEG decoding
    and HTTP is worth more than one batch finishing sooner. 1 puts every thread on one batch
    (lowest latency for a lone request). ``cache_dir``: OpenVINO's compiled-model cache (a
    restart loads the compiled blobs instead of converting and compiling the ONNX again); ``None``
    compiles every time.
    """

    def __init__(
        self,
        path: Path,
        threads: int,
        input_name: str,
        precision: str = "bf16",
        streams: int = 1,
        cache_dir: Path | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {PRECISIONS}, got {precision!r}")
        if streams < 1:
            raise ValueError(f"OpenVINO streams must be >= 1, got {streams}")
        streams = min(streams, max(1, int(threads)))  # a stream needs a thread of its own
        core = shared_core()
        if precision == "bf16" and not cpu_supports_bf16():
            log.warning("this CPU has no native bf16: OpenVINO runs %s in fp32 instead", path)
            precision = "fp32"
        config = _compile_config(precision, threads, streams)
        self.path = path
        self.cache_dir = usable_cache_dir(cache_dir)
        self._graph = None  # the read model, only when compiling without the cache
        try:
            self.compiled = self._compile(core, config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ArtifactError(f"OpenVINO cannot load {path}: {exc}") from exc
        self.from_cache = _loaded_from_cache(self.compiled)  # every compiled model, once solo is
        inputs = [name for port in self.compiled.inputs for name in port.get_names()]
        if input_name not in inputs:
            raise ArtifactError(f"{path} has inputs {inputs}, the manifest says {input_name!r}")
        self.input_name = input_name
        self.output_names = tuple(port.get_any_name() for port in self.compiled.outputs)
        self.precision = precision
        self._make_requests(core, config)
        self._graph = None  # the compiled models hold all they need

    def _make_requests(self, core, config: dict) -> None:
        self.parallel_calls = int(self.compiled.get_property("NUM_STREAMS"))
        # OpenVINO's Python layer fills a lazy static table on the first element-type -> numpy
        # dtype lookup; two threads doing it at once for the first time deadlock (1 run in 5 here
        # with 2 streams). Fill it now, on this one thread.
        for port in [*self.compiled.inputs, *self.compiled.outputs]:
            port.get_element_type().to_dtype()
        # An infer request is not reentrant: each call borrows one from the pool (one per stream),
        # so up to parallel_calls threads run at once and any more wait their turn.
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.parallel_calls):
            self._requests.put(self.compiled.create_infer_request())
        # With streams, a lone batch would run on one stream's threads only; a second compiled
        # model with every thread on one request serves it (``run_solo``, when nothing else runs).
        self._solo: queue.SimpleQueue = queue.SimpleQueue()
        self.has_solo = self.parallel_calls > 1 and self._compile_solo(core, config)
        if self.has_solo:
            self.from_cache = self.from_cache and _loaded_from_cache(self.compiled_solo)

    @property
    def cache_state(self) -> str:
        """For the start-up log: where the compiled model came from."""
        if self.cache_dir is None:
            return "compiled; no compiled-model cache"
        if self.from_cache:
            return f"from the compiled-model cache {self.cache_dir}"
        return f"compiled; written to the compiled-model cache {self.cache_dir}"

    def _compile(self, core, config: dict):
        """From the cache when it has this file + config (OpenVINO's own key: the file's path,
        size and modification time, the config, the device and the OpenVINO version), else
        compiled and written there. Compiling from the path lets a cache hit skip reading the
        ONNX at all. A cache that fails (OpenVINO already discards a corrupt or foreign blob and
        recompiles; anything else) costs a warning and a compile without it, never the start."""
        if self.cache_dir is not None:
            try:
                return core.compile_model(
                    str(self.path), "CPU", {**config, "CACHE_DIR": str(self.cache_dir)}
                )
            except Exception as exc:  # noqa: BLE001 - retried below without the cache
                log.warning("OpenVINO: compiling %s with the cache in %s failed (%s); compiling "
                            "without the cache", self.path, self.cache_dir, exc)  # fmt: skip
                self.cache_dir = None
        if self._graph is None:
            self._graph = core.read_model(str(self.path))
        return core.compile_model(self._graph, "CPU", config)

    def _compile_solo(self, core, config: dict) -> bool:
        solo = {k: v for k, v in config.items() if k != "NUM_STREAMS"}
        solo["PERFORMANCE_HINT"] = "LATENCY"
        try:
            self.compiled_solo = self._compile(core, solo)
        except Exception as exc:  # noqa: BLE001 - only a lone client's speed is at stake
            log.warning("OpenVINO: no all-threads model for lone batches: %s", exc)
            return False
        self._solo.put(self.compiled_solo.create_infer_request())
        return True

    def run(self, pixels: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        unknown = set(outputs) - set(self.output_names)
        if unknown:
            raise KeyError(f"unknown outputs {sorted(unknown)}; the model has {self.output_names}")
        return self._infer(self._requests, pixels, outputs)

    def run_solo(self, pixels: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """``run`` on every thread at once: for a batch that runs alone (the caller makes sure
        no ``run`` is in flight, or they share the cores)."""
        if not self.has_solo:
            return self.run(pixels, outputs)
        unknown = set(outputs) - set(self.output_names)
        if unknown:
            raise KeyError(f"unknown outputs {sorted(unknown)}; the model has {self.output_names}")
        return self._infer(self._solo, pixels, outputs)

    def _infer(
        self, requests: queue.SimpleQueue, pixels: np.ndarray, outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        request = requests.get()
        try:
            # share_inputs: the engine reads the caller's array in place (no copy of the batch).
            request.infer({self.input_name: pixels}, share_inputs=True)
            # Copies: the request's output buffers are reused by the next call.
            return {name: request.get_tensor(name).data.copy() for name in outputs}
        finally:
            requests.put(request)
