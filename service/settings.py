"""Server settings from ``DINO_*`` environment variables (pydantic-settings).

The names are part of the contract (DESIGN.md, README). Every default is documented here and in the
README; change one, change both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.manifest import MANIFEST_NAME


class SettingsError(ValueError):
    """The configuration cannot be served (e.g. no model, or several and none named)."""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DINO_", extra="ignore", protected_namespaces=())

    models_dir: Path = Field(Path("./models"), description="the model store")
    model: str | None = Field(
        None, description="model to serve; default: the only one in the store"
    )
    model_variant: Literal["fp32", "int8"] = Field("fp32", description="which ONNX file to run")
    engine: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto",
        description="inference engine; auto: openvino (extra fast) with bf16 where the CPU has it, "
        "else onnxruntime",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="openvino inference precision; auto: bf16 where the CPU has it"
    )
    data_dir: Path = Field(Path("./data"), description="where the index and items live")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_token: str | None = Field(None, description="when set, mutating endpoints need a bearer")
    threads: int = Field(
        default_factory=_cores, ge=1, description="inference threads (onnxruntime intra-op)"
    )
    engine_streams: int = Field(
        0, ge=0, description="OpenVINO: batches run at once, threads split between them; 0: auto"
    )
    # 8: OpenVINO runs batch 8 as fast per image as 16, and smaller batches let JPEG decoding
    # overlap inference on a few cores (measured: /embed at c=32 +7% over 16).
    max_batch: int = Field(8, ge=1, description="most images in one inference call")
    batch_wait_ms: float = Field(3.0, ge=0, description="how long a batch waits to fill up")
    queue_limit: int = Field(256, ge=1, description="images waiting before 503")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="bytes per image file")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1, description="bytes per request body")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width*height per image")
    max_images_per_request: int = Field(64, ge=1)
    max_k: int = Field(100, ge=1, description="largest k for /similar")
    attention_max_side: int = Field(
        448, ge=16, description="long side for /attention at patch 16; scaled with the patch size"
    )
    index_type: Literal["flat", "hnsw", "ivf"] = "flat"
    index_params: dict[str, int] = Field(
        default_factory=dict,
        description='JSON, e.g. {"ef_search": 128} (hnsw) or {"nlist": 4096, "nprobe": 32} (ivf); '
        "with DINO_INDEX_URL: m, ef_construction, ef_search (pgvector HNSW)",
    )
    index_url: str | None = Field(
        None,
        description="postgresql://... : keep the index in PostgreSQL + pgvector, shared by any "
        "number of servers; unset: the embedded index in data_dir",
    )
    thumbnail_side: int = Field(128, ge=16, le=512, description="stored JPEG thumbnail size")
    retry_after_s: int = Field(1, ge=1, description="Retry-After on 503")


def find_model_dir(settings: Settings) -> Path:
    """The served model's folder: ``DINO_MODEL`` or the only model in ``DINO_MODELS_DIR``."""
    store = settings.models_dir
    if not store.is_dir():
        raise SettingsError(
            f"model store {store} does not exist: set DINO_MODELS_DIR or export a model "
            "with `python -m training.export`"
        )
    if settings.model:
        path = store / settings.model
        if not (path / MANIFEST_NAME).is_file():
            raise SettingsError(f"DINO_MODEL={settings.model!r}: no {MANIFEST_NAME} in {path}")
        return path
    found = sorted(p for p in store.iterdir() if (p / MANIFEST_NAME).is_file())
    if not found:
        raise SettingsError(
            f"no model in {store} (a model is a folder with {MANIFEST_NAME} and model.onnx): "
            "export one with `python -m training.export`"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise SettingsError(f"several models in {store} ({names}): choose one with DINO_MODEL")
    return found[0]


def attention_max_side(settings: Settings, patch_size: int) -> int:
    """The configured side is for patch 16; keep the same patch grid for other patch sizes."""
    return max(patch_size, round(settings.attention_max_side * patch_size / 16))
