"""Response bodies of the HTTP API (they are what OpenAPI documents)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from artifact import Manifest


class ErrorResponse(BaseModel):
    detail: str = Field(description="what went wrong and, where possible, what to change")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    normalized: bool
    transform: str = Field(
        default="none",
        description="the embedding transform applied before normalisation ('none' when raw)",
    )
    embeddings: list[list[float]] = Field(description="one row per image, in input order")


class AttentionResponse(BaseModel):
    model: str
    heads: int
    grid: tuple[int, int] = Field(description="patches down and across: [h, w]")
    image_size: tuple[int, int] = Field(description="[H, W] of the resized image the maps cover")
    patch_size: int
    maps: list[list[list[float]]] = Field(
        description="per head, [h][w] CLS-to-patch attention of the last block; each sums to 1"
    )
    threshold: float | None = None
    masks: list[list[list[bool]]] | None = Field(
        None,
        description="per head, the smallest set of patches holding `threshold` of the attention",
    )


class SimilarResult(BaseModel):
    id: str
    score: float = Field(description="cosine similarity")
    metadata: dict[str, Any]


class SimilarResponse(BaseModel):
    model: str
    results: list[SimilarResult] = Field(description="best first")


class ItemsAdded(BaseModel):
    ids: list[str] = Field(description="in input order; durable once this response is sent")


class Item(BaseModel):
    id: str
    metadata: dict[str, Any]
    source: str | None = None
    created_at: str | None = None
    has_thumbnail: bool = False


class ItemList(BaseModel):
    items: list[Item]
    total: int
    offset: int


class ModelInfo(Manifest):
    """The loaded model's manifest, plus what the server chose to run."""

    variant: str
    served_file: str
    sha256: str = Field(description="sha256 of the fp32 file: the identity the index uses")
    served_dim: int = Field(
        description="dimension of the vectors /embed returns and the index holds (after the "
        "embedding transform, if any)"
    )
    applied_transform: dict = Field(
        default_factory=dict,
        description="what the server does to the model's raw embedding before indexing / "
        "returning it",
    )
    engine_choice: dict[str, Any] | None = Field(
        default=None,
        description="the served engine, precision and variant, how they were chosen (measured, "
        "cached or forced) and the images/s each candidate ran at",
    )


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    model: str | None = None
    index_size: int | None = None
    detail: str | None = None


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer with."""
    text = {
        400: "undecodable or truncated image",
        401: "missing or wrong bearer token (only when DINO_API_TOKEN is set)",
        404: "unknown id",
        409: "conflict (model without attention, or an id that already exists)",
        413: "too many bytes or pixels",
        415: "not an accepted image type (JPEG, PNG, WebP, GIF, BMP, TIFF)",
        422: "invalid parameters",
        503: "busy (queue full or decoding budget spent, see Retry-After) or not ready",
    }
    return {code: {"model": ErrorResponse, "description": text[code]} for code in codes}
