"""Choose and open the inference engine from the settings (``DINO_ENGINE``, ``DINO_PRECISION``).

* ``onnxruntime``: the reference engine, fp32 (or the artifact's int8 file via
  ``DINO_MODEL_VARIANT=int8``).
* ``openvino``: the same ONNX file on OpenVINO's CPU plugin; ``DINO_PRECISION=bf16`` runs the
  matrix products in bf16 on AMX / AVX-512-BF16 (falls back to fp32, with a warning, on CPUs
  without bf16). Needs the optional ``openvino`` package (extra ``fast``).
* ``auto``: openvino with bf16 when the package is installed and the CPU has bf16, otherwise
  onnxruntime fp32; the choice is logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.engine import Engine, load_engine, model_file
from service.manifest import ArtifactError, Manifest
from service.settings import SettingsError

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "openvino")
PRECISIONS = ("auto", "fp32", "bf16")


def resolve(engine: str, precision: str, variant: str = "fp32") -> tuple[str, str]:
    """The concrete (engine, precision) for the requested pair; raises ``SettingsError`` (a
    ``ValueError``) for a pair that cannot run (bf16 on onnxruntime: no bf16 CPU kernels)."""
    if engine not in ENGINES:
        raise SettingsError(f"DINO_ENGINE must be one of {ENGINES}, got {engine!r}")
    if precision not in PRECISIONS:
        raise SettingsError(f"DINO_PRECISION must be one of {PRECISIONS}, got {precision!r}")
    if engine == "auto":
        from service.engine_openvino import cpu_supports_bf16, openvino_available

        # fp32 asked for, or the int8 file (quantised for onnxruntime): the reference engine.
        plain = precision == "fp32" or variant != "fp32"
        fast = not plain and openvino_available() and cpu_supports_bf16()
        engine = "openvino" if fast else "onnxruntime"
    if engine == "onnxruntime":
        if precision == "bf16":
            raise SettingsError(
                "DINO_PRECISION=bf16 needs DINO_ENGINE=openvino (or auto): onnxruntime's CPU "
                "provider runs fp32 (or the int8 file with DINO_MODEL_VARIANT=int8)"
            )
        return "onnxruntime", "fp32"
    return "openvino", "fp32" if precision == "fp32" else "bf16"


def openvino_streams(streams: int, threads: int) -> int:
    """``DINO_ENGINE_STREAMS``: how many batches OpenVINO runs at once, the threads split between
    them. 0 (auto): 2 streams up to 8 threads (2 cores: 2 streams of 1 thread), one per 4 threads
    above; otherwise the number asked for, at most ``threads``. Measured on 2 cores (ViT-S/16
    bf16, batch 8): 2 streams x 1 thread run ~100 img/s against ~86 for 1 stream x 2 threads,
    and no thread waits on another inside a layer while JPEG decoding takes a core away."""
    if streams < 0:
        raise SettingsError(f"DINO_ENGINE_STREAMS must be >= 0, got {streams}")
    if streams == 0:
        streams = 2 if threads <= 8 else threads // 4
    return max(1, min(streams, threads))


def open_engine(
    model_dir: Path,
    manifest: Manifest,
    variant: str,
    threads: int,
    engine: str,
    precision: str,
    streams: int = 1,
) -> Engine:
    """Load the served model with the chosen engine; ``ArtifactError`` when it cannot.
    ``streams`` (OpenVINO only; see ``openvino_streams``) is how many batches run at once."""
    kind, prec = resolve(engine, precision, variant)
    if kind == "onnxruntime":
        return load_engine(model_dir, manifest, variant, threads)
    from service.engine_openvino import OpenVinoEngine

    path = Path(model_dir) / model_file(manifest, variant)
    streams = openvino_streams(streams, threads)
    opened = OpenVinoEngine(path, threads, manifest.input_name, prec, streams)
    missing = set(manifest.outputs) - set(opened.output_names)
    if missing:
        raise ArtifactError(f"{path} lacks outputs {sorted(missing)} that its manifest lists")
    log.info(
        "loaded %s with OpenVINO (%s, %s, %d threads, %d streams)",
        path, variant, opened.precision, threads, opened.parallel_calls,
    )  # fmt: skip
    return opened
