"""The inference engine: one onnxruntime session behind a tiny interface.

Anything with ``run(pixels, outputs) -> {name: array}`` and the attributes below can replace
``OrtEngine`` (an OpenVINO or bf16 engine, say) without touching the batcher or the routes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from service.manifest import INT8_FILE, MODEL_FILE, ArtifactError, Manifest

log = logging.getLogger(__name__)


class Engine(Protocol):
    input_name: str
    output_names: tuple[str, ...]

    def run(self, pixels: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]: ...


def model_file(manifest: Manifest, variant: str) -> str:
    """The ONNX file name for ``fp32`` or a variant key listed in the manifest (e.g. ``int8``)."""
    if variant == "fp32":
        return MODEL_FILE
    if variant in manifest.variants:
        return manifest.variants[variant].file
    if variant == "int8" and INT8_FILE in manifest.files:
        return INT8_FILE
    have = ", ".join(["fp32", *manifest.variants]) or "fp32"
    raise ArtifactError(f"model {manifest.name!r} has no {variant!r} variant (it has: {have})")


class OrtEngine:
    """One InferenceSession: all graph optimisations, ``threads`` intra-op, one inter-op."""

    def __init__(self, path: Path, threads: int, input_name: str) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"onnxruntime cannot load {path}: {exc}") from exc
        inputs = [i.name for i in self.session.get_inputs()]
        if input_name not in inputs:
            raise ArtifactError(f"{path} has inputs {inputs}, the manifest says {input_name!r}")
        self.input_name = input_name
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.path = path

    def run(self, pixels: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        values = self.session.run(list(outputs), {self.input_name: pixels})
        return dict(zip(outputs, values, strict=True))


def load_engine(model_dir: Path, manifest: Manifest, variant: str, threads: int) -> OrtEngine:
    path = Path(model_dir) / model_file(manifest, variant)
    engine = OrtEngine(path, threads, manifest.input_name)
    missing = set(manifest.outputs) - set(engine.output_names)
    if missing:
        raise ArtifactError(f"{path} lacks outputs {sorted(missing)} that its manifest lists")
    log.info("loaded %s (%s, %d threads)", path, variant, threads)
    return engine


def l2_normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)
