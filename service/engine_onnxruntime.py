"""The onnxruntime engine: one InferenceSession behind the small ``Engine`` interface
(``input_name``, ``output_names``, ``run(pixels, outputs) -> {name: array}``; see
``service.engine_choice``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from artifact.manifest import ArtifactError, Manifest

log = logging.getLogger(__name__)


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
            raise ArtifactError(f"{path} has inputs {inputs}, its description says {input_name!r}")
        self.input_name = input_name
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.path = path

    def run(self, pixels: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        values = self.session.run(list(outputs), {self.input_name: pixels})
        return dict(zip(outputs, values, strict=True))


def load_engine(model_dir: Path, manifest: Manifest, variant: str, threads: int) -> OrtEngine:
    """The served model's ``variant`` (``fp32`` or a manifest variant) on onnxruntime."""
    from service.engine_choice import check_outputs, model_file

    path = Path(model_dir) / model_file(manifest, variant)
    engine = OrtEngine(path, threads, manifest.input_name)
    check_outputs(engine, manifest, path)
    log.info("loaded %s (%s, %d threads)", path, variant, threads)
    return engine
