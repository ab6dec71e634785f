"""Choose and open the inference engine from the settings (``DINO_ENGINE``, ``DINO_PRECISION``).

* ``onnxruntime``: the reference engine, fp32 (or the artifact's int8 file via
  ``DINO_MODEL_VARIANT=int8``).
* ``openvino``: the same ONNX file on OpenVINO's CPU plugin; ``DINO_PRECISION=bf16`` runs the
  matrix products in bf16 on AMX / AVX-512-BF16 (falls back to fp32, with a warning, on CPUs
  without bf16). Needs the optional ``openvino`` package (extra ``fast``).
* ``auto``: openvino with bf16 when the package is installed and the CPU has bf16, otherwise
  onnxruntime fp32; the choice is logged.

Every graph the server runs (the model, and the decoder beside it) is opened here, so all of
them follow the same choice.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from artifact.manifest import ArtifactError, Manifest
from artifact.names import INT8_FILE, MODEL_FILE
from service.settings import SettingsError

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "openvino")
PRECISIONS = ("auto", "fp32", "bf16")
OPENVINO_CACHE = "openvino-cache"  # under DINO_DATA_DIR: OpenVINO's compiled models


class Engine(Protocol):
    """What the batcher and the routes need from an engine; ``OrtEngine`` and
    ``OpenVinoEngine`` both have it."""

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


def openvino_cache(root: Path | None, manifest: Manifest) -> Path | None:
    """This model's folder of OpenVINO compiled blobs under ``root`` (the server's
    ``DINO_DATA_DIR/openvino-cache``), named after the model's sha256 so that a new model never
    meets an old blob (OpenVINO's own key adds the file's path, size and time, the config and
    its version). Other models' folders are removed: a data folder serves one model, and each
    blob is about the model's size. ``None`` (no root): no cache."""
    if root is None:
        return None
    folder = Path(root) / manifest.model_sha256[:16]
    try:
        stale = [p for p in Path(root).iterdir() if p.is_dir() and p.name != folder.name]
    except OSError:  # not there yet (created on first compile) or unreadable
        stale = []
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
        log.info("removed the OpenVINO cache of another model: %s", old)
    return folder


def open_graph(
    path: Path,
    input_name: str,
    threads: int,
    engine: str,
    precision: str,
    variant: str = "fp32",
    streams: int = 1,
    cache_dir: Path | None = None,
) -> Engine:
    """Any ONNX graph of the artifact on the chosen engine (``streams``: OpenVINO's
    ``DINO_ENGINE_STREAMS``, already resolved by ``openvino_streams``; ``cache_dir``: OpenVINO's
    compiled-model cache folder, see ``openvino_cache``)."""
    kind, prec = resolve(engine, precision, variant)
    if kind == "onnxruntime":
        from service.engine_onnxruntime import OrtEngine

        return OrtEngine(path, threads, input_name)
    from service.engine_openvino import OpenVinoEngine

    return OpenVinoEngine(path, threads, input_name, prec, streams, cache_dir)


def check_outputs(engine: Engine, manifest: Manifest, path: Path) -> None:
    missing = set(manifest.outputs) - set(engine.output_names)
    if missing:
        raise ArtifactError(f"{path} lacks outputs {sorted(missing)} that its manifest lists")


def open_engine(
    model_dir: Path,
    manifest: Manifest,
    variant: str,
    threads: int,
    engine: str,
    precision: str,
    streams: int = 1,
    cache_dir: Path | None = None,
) -> Engine:
    """Load the served model with the chosen engine; ``ArtifactError`` when it cannot.
    ``streams`` (OpenVINO only; see ``openvino_streams``) is how many batches run at once;
    ``cache_dir`` (OpenVINO only) the root of the compiled-model cache (the server's
    ``DINO_DATA_DIR/openvino-cache``; ``None``: compile every time)."""
    kind, _ = resolve(engine, precision, variant)
    if kind == "onnxruntime":
        from service.engine_onnxruntime import load_engine

        return load_engine(model_dir, manifest, variant, threads)
    t0 = time.perf_counter()
    path = Path(model_dir) / model_file(manifest, variant)
    streams = openvino_streams(streams, threads)
    cache = openvino_cache(cache_dir, manifest)
    opened = open_graph(
        path, manifest.input_name, threads, engine, precision, variant, streams, cache
    )
    check_outputs(opened, manifest, path)
    log.info(
        "loaded %s with OpenVINO (%s, %s, %d threads, %d streams) in %.2f s (%s)",
        path, variant, opened.precision, threads, opened.parallel_calls,  # type: ignore[attr-defined]
        time.perf_counter() - t0, opened.cache_state,  # type: ignore[attr-defined]
    )  # fmt: skip
    return opened
