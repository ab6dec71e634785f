"""An OpenVINO engine: reads the same ``model.onnx`` as onnxruntime and runs it on the CPU plugin.

Why: onnxruntime's CPU provider runs this ViT in fp32 only, which leaves the AMX/AVX-512-BF16
matrix units idle. OpenVINO with ``INFERENCE_PRECISION_HINT=bf16`` computes the matrix products in
bf16 (fp32 accumulation) and keeps the same artifact, inputs and outputs. On a CPU without native
bf16 the plugin cannot honour the hint; we then ask for f32 explicitly and log it, so the server
still runs (at onnxruntime-like speed) instead of failing.

Same small interface as ``service.engine.OrtEngine``: ``input_name``, ``output_names``,
``run(pixels, outputs) -> {name: array}``. openvino is an optional dependency (extra ``fast``).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from service.manifest import ArtifactError

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
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _import_openvino():
    try:
        import openvino as ov
    except ImportError as exc:
        raise ArtifactError(
            "DINO_ENGINE=openvino needs the openvino package: pip install '.[fast]' "
            "(or set DINO_ENGINE=onnxruntime)"
        ) from exc
    return ov


class OpenVinoEngine:
    """One compiled model on the CPU plugin with ``threads`` inference threads.

    ``precision`` is the inference precision of the matrix products: ``bf16`` (falls back to
    ``fp32`` with a warning when the CPU lacks bf16) or ``fp32``.
    """

    def __init__(self, path: Path, threads: int, input_name: str, precision: str = "bf16") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {PRECISIONS}, got {precision!r}")
        ov = _import_openvino()
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property(
            "CPU", "OPTIMIZATION_CAPABILITIES"
        ):
            log.warning("this CPU has no native bf16: OpenVINO runs %s in fp32 instead", path)
            precision = "fp32"
        config = {
            "INFERENCE_PRECISION_HINT": _OV_TYPES[precision],
            "INFERENCE_NUM_THREADS": int(threads),
            # One request at a time (the batcher serialises calls): latency mode uses all threads
            # for that request instead of splitting them into parallel streams.
            "PERFORMANCE_HINT": "LATENCY",
        }
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ArtifactError(f"OpenVINO cannot load {path}: {exc}") from exc
        inputs = [name for port in self.compiled.inputs for name in port.get_names()]
        if input_name not in inputs:
            raise ArtifactError(f"{path} has inputs {inputs}, the manifest says {input_name!r}")
        self.input_name = input_name
        self.output_names = tuple(port.get_any_name() for port in self.compiled.outputs)
        self.precision = precision
        self.path = path
        self._request = self.compiled.create_infer_request()
        # An infer request is not reentrant; the batcher calls from one thread, tests may not.
        self._lock = threading.Lock()

    def run(self, pixels: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        unknown = set(outputs) - set(self.output_names)
        if unknown:
            raise KeyError(f"unknown outputs {sorted(unknown)}; the model has {self.output_names}")
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        with self._lock:
            self._request.infer({self.input_name: pixels})
            # Copies: the request's output buffers are reused by the next call.
            return {name: self._request.get_tensor(name).data.copy() for name in outputs}
