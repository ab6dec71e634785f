"""Inference paths the engine section compares. Each turns ``[B,3,H,W]`` float32 pixels into
``[B,D]`` embeddings (the CLS feature the server returns before L2 normalisation)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.artifacts import ModelSpec, build_torch, openvino_int8_possible
from benchmarks.common import has_module

log = logging.getLogger(__name__)

Embed = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PathInfo:
    name: str
    precision: str  # which GEMM ceiling it is measured against: fp32 | bf16 | int8
    servable: bool  # can the server run it (DINO_ENGINE / DINO_MODEL_VARIANT)?
    note: str


PATHS = {
    "torch_fp32": PathInfo("torch_fp32", "fp32", False, "PyTorch eager fp32: the baseline"),
    "torch_bf16": PathInfo("torch_bf16", "bf16", False, "PyTorch eager, bf16 autocast"),
    "ort_fp32": PathInfo("ort_fp32", "fp32", True, "onnxruntime fp32: the reference engine"),
    "ort_int8": PathInfo("ort_int8", "int8", True, "onnxruntime, the artifact's dynamic int8 file"),
    "ov_fp32": PathInfo("ov_fp32", "fp32", True, "OpenVINO fp32, same model.onnx"),
    "ov_bf16": PathInfo("ov_bf16", "bf16", True, "OpenVINO bf16 inference precision, same ONNX"),
    "ov_int8": PathInfo("ov_int8", "int8", True, "OpenVINO, the artifact's NNCF static int8 IR"),
}


def available_paths() -> list[str]:
    names = list(PATHS)
    if not has_module("openvino"):
        log.warning("openvino is not installed (pip install '.[fast]'): OpenVINO paths skipped")
        names = [n for n in names if not n.startswith("ov_")]
    elif not openvino_int8_possible():
        log.warning("nncf is not installed (pip install '.[train]'): ov_int8 skipped")
        names.remove("ov_int8")
    return names


def make_path(name: str, spec: ModelSpec, model_dir: Path, threads: int) -> Embed:
    from artifact import INPUT_NAME, INT8_FILE, MODEL_FILE

    if name.startswith("torch_"):
        import torch

        torch.set_num_threads(threads)
        model = build_torch(spec)
        bf16 = name == "torch_bf16"

        def embed(pixels: np.ndarray) -> np.ndarray:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                return model(torch.from_numpy(pixels)).float().numpy()

        return embed
    if name.startswith("ort_"):
        from service.engine_onnxruntime import OrtEngine

        file = MODEL_FILE if name == "ort_fp32" else INT8_FILE
        engine = OrtEngine(model_dir / file, threads, INPUT_NAME)
    elif name == "ov_int8":  # other ops in fp32, as the server runs it and its gate measured
        from service.engine_openvino import OpenVinoEngine
        from training.quantize_openvino import XML_FILE

        engine = OpenVinoEngine(model_dir / XML_FILE, threads, INPUT_NAME, "fp32")
    elif name.startswith("ov_"):
        from service.engine_openvino import OpenVinoEngine

        engine = OpenVinoEngine(model_dir / MODEL_FILE, threads, INPUT_NAME, name[3:])
    else:
        raise ValueError(f"unknown path {name!r}; known: {sorted(PATHS)}")

    def run(pixels: np.ndarray) -> np.ndarray:
        return engine.run(pixels, ("embedding",))["embedding"]

    return run
