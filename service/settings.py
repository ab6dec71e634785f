"""Server settings from ``DINO_*`` environment variables (pydantic-settings).

The names are part of the contract (CHANGELOG.md). Every default is documented here and in
docs/serving.md (the security-related ones in docs/security.md); change one, change both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from artifact import MANIFEST_NAME

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_BINDS = ("", "0.0.0.0", "::")


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
    model_variant: str = Field(
        "auto",
        pattern=r"^[a-z0-9_]+$",
        description="which file to run: fp32, or a manifest variant (int8, int8_openvino); "
        "auto: chosen with the engine by measurement",
    )
    engine: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto",
        description="inference engine; auto: the fastest variant measured on this machine "
        "(cached in DINO_DATA_DIR/engine_choice.json)",
    )
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto", description="inference precision (int8: the model's int8 variant); auto: measured"
    )
    data_dir: Path = Field(Path("./data"), description="where the index and items live")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_token: str | None = Field(None, description="when set, mutating endpoints need a bearer")
    allowed_hosts: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description='Host header names served (JSON list or comma list; "*": any); default: '
        "127.0.0.1, localhost, ::1 and DINO_HOST when it names one address",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="browser origins (scheme://host[:port]) allowed to POST/DELETE besides the "
        'server\'s own; "*": any',
    )
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
    max_request_pixels: int = Field(
        256_000_000, ge=1, description="width*height summed over the images of one request"
    )
    max_decode_pixels: int = Field(
        80_000_000,
        ge=1,
        description="width*height of the images being decoded at once, whole server; at least "
        "DINO_MAX_IMAGE_PIXELS",
    )
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
    retry_after_s: int = Field(1, ge=1, description="Retry-After on every 503")

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        """A JSON list, or the simpler ``a,b``."""
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.allowed_hosts == []:  # DINO_ALLOWED_HOSTS="": the default, not "serve no one"
            self.allowed_hosts = None
        if self.max_decode_pixels < self.max_image_pixels:
            raise ValueError(
                f"DINO_MAX_DECODE_PIXELS ({self.max_decode_pixels}) must be at least "
                f"DINO_MAX_IMAGE_PIXELS ({self.max_image_pixels}): a largest image could never "
                "be decoded"
            )
        return self

    def host_names(self) -> tuple[str, ...]:
        """The Host header names served: DINO_ALLOWED_HOSTS, or loopback plus DINO_HOST."""
        if self.allowed_hosts is not None:
            return tuple(h.lower() for h in self.allowed_hosts)
        bound = self.host.strip("[]").lower()
        extra = () if bound in WILDCARD_BINDS else (bound,)
        return tuple(dict.fromkeys((*LOOPBACK_NAMES, *extra)))


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
