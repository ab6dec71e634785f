"""Endpoints over the index: /similar, /items, /index."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio
import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Response, UploadFile

from service.images import thumbnail_jpeg
from service.index import Hit
from service.index.backend import IndexBackend
from service.index.filters import parse_filter
from service.index.validate import shown_source
from service.preprocess import eval_pixels
from service.routes_common import RuntimeDep, read_images, require_token
from service.runtime import Runtime
from service.schemas import (
    Item,
    ItemList,
    ItemsAdded,
    SimilarResponse,
    SimilarResult,
    error_responses,
)

router = APIRouter(tags=["index"])
DEFAULT_K = 10
# SQLite integers are 64-bit: a larger OFFSET raised OverflowError (a 500) before this bound.
MAX_OFFSET = 2**62
K_HELP = "how many neighbours: default 10 (or DINO_MAX_K if lower), at most DINO_MAX_K"
KQuery = Annotated[int | None, Query(ge=1, description=K_HELP)]
FILTER_HELP = 'JSON object of metadata equalities, e.g. {"label": "sneaker"}: only matching items'
MIN_SCORE_HELP = "drop results scoring below this cosine (-1..1); default: keep all"
MinScoreQuery = Annotated[
    float | None, Query(ge=-1.0, le=1.0, allow_inf_nan=False, description=MIN_SCORE_HELP)
]


def _check_k(rt: Runtime, k: int | None) -> int:
    if k is None:
        return min(DEFAULT_K, rt.settings.max_k)
    if k > rt.settings.max_k:
        raise HTTPException(422, f"k={k} is above the limit of {rt.settings.max_k} (DINO_MAX_K)")
    return k


def _results(rt: Runtime, hits: list[Hit], min_score: float | None = None) -> SimilarResponse:
    floor = -np.inf if min_score is None else min_score
    results = [SimilarResult(id=i, score=float(s), metadata=m) for i, s, m in hits if s >= floor]
    return SimilarResponse(model=rt.loaded_manifest().name, results=results)


@router.get(
    "/similar",
    response_model=SimilarResponse,
    responses=error_responses(404, 422, 503),
    summary="Nearest neighbours of an indexed item (the item itself left out)",
)
async def similar_by_id(
    rt: RuntimeDep,
    id: Annotated[str, Query(min_length=1)],
    k: KQuery = None,
    filter: Annotated[str | None, Query(description=FILTER_HELP)] = None,
    min_score: MinScoreQuery = None,
) -> SimilarResponse:
    k = _check_k(rt, k)
    flt = parse_filter(filter)
    store = rt.open_index()
    hits = await anyio.to_thread.run_sync(store.similar, id, k, flt)
    if hits is None:
        raise HTTPException(404, f"no item with id {id!r} in the index")
    return _results(rt, hits, min_score)


@router.post(
    "/similar",
    response_model=SimilarResponse,
    responses=error_responses(400, 413, 415, 422, 503),
    summary="Nearest neighbours of a new image",
)
async def similar_by_image(
    rt: RuntimeDep,
    image: Annotated[UploadFile, File(description="one image file")],
    k: Annotated[int | None, Form(ge=1, description=K_HELP)] = None,
    filter: Annotated[str | None, Form(description=FILTER_HELP)] = None,
    min_score: Annotated[
        float | None, Form(ge=-1.0, le=1.0, allow_inf_nan=False, description=MIN_SCORE_HELP)
    ] = None,
) -> SimilarResponse:
    k = _check_k(rt, k)
    flt = parse_filter(filter)
    (manifest, batcher), store = rt.model_parts(), rt.open_index()
    (pixels,) = await read_images(rt, [image], lambda img: eval_pixels(img, manifest))
    vector = rt.vectors((await batcher.infer([pixels], ("embedding",)))["embedding"])[0]
    hits = await anyio.to_thread.run_sync(lambda: store.search(vector, k, filter=flt))
    return _results(rt, hits[0], min_score)


def _parse_metadata(text: str | None, n: int) -> list[dict[str, Any] | None]:
    """One JSON object for every image, or a JSON array with one object per image."""
    if text is None or not text.strip():
        return [None] * n
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers over Python's 4300-digit limit;
        # RecursionError, thousands of nested brackets. Both were 500s.
        raise HTTPException(422, f"metadata is not valid JSON: {_short(exc)}") from None
    if isinstance(value, dict):
        return [value] * n
    if isinstance(value, list) and len(value) == n:
        return value
    raise HTTPException(
        422, f"metadata must be a JSON object, or an array of {n} objects (one per image)"
    )


def _short(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if not isinstance(exc, json.JSONDecodeError):  # int() refusing a 4300+ digit number
        return "a number has too many digits"
    return str(exc)


def _parse_ids(ids: list[str] | None, n: int) -> list[str] | None:
    """Repeated ``ids`` fields, or one field holding a JSON array of strings."""
    if not ids:
        return None
    if len(ids) == 1 and n > 1 and ids[0].lstrip().startswith("["):
        try:
            ids = json.loads(ids[0])
        except (ValueError, RecursionError) as exc:
            raise HTTPException(422, f"ids is not a valid JSON array: {_short(exc)}") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise HTTPException(422, "ids must be strings")
    if len(ids) != n:
        raise HTTPException(422, f"got {len(ids)} ids for {n} images")
    return ids


@router.post(
    "/items",
    response_model=ItemsAdded,
    status_code=201,
    dependencies=[Depends(require_token)],
    responses=error_responses(400, 401, 409, 413, 415, 422, 503),
    summary="Add images to the index (durable once the response is sent)",
)
async def add_items(
    rt: RuntimeDep,
    images: Annotated[list[UploadFile], File(description="1..N image files")],
    ids: Annotated[
        list[str] | None, Form(description="one id per image (default: generated)")
    ] = None,
    metadata: Annotated[
        str | None, Form(description="JSON object for every image, or array of one per image")
    ] = None,
) -> ItemsAdded:
    (manifest, batcher), store = rt.model_parts(), rt.open_index()
    given_ids = _parse_ids(ids, len(images))
    metas = _parse_metadata(metadata, len(images))
    side = rt.settings.thumbnail_side
    loaded = await read_images(
        rt, images, lambda img: (eval_pixels(img, manifest), thumbnail_jpeg(img, side))
    )
    out = await batcher.infer([px for px, _ in loaded], ("embedding",))
    vectors = rt.vectors(out["embedding"])
    # Only the file's own name, as a label: a client never names a server path (rebuild never
    # opens sources without a root, and answers never show more than this name).
    sources = [shown_source(upload.filename or None, None) for upload in images]
    thumbs = [thumb for _, thumb in loaded]
    added = await anyio.to_thread.run_sync(
        lambda: store.add(
            vectors, ids=given_ids, metadata=metas, sources=sources, thumbnails=thumbs
        )
    )
    return ItemsAdded(ids=list(added))


@router.get(
    "/items",
    response_model=ItemList,
    responses=error_responses(422, 503),
    summary="List items (for the web page's gallery)",
)
async def list_items(
    rt: RuntimeDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> ItemList:
    store = rt.open_index()
    items, total = await anyio.to_thread.run_sync(store.list_items, offset, limit)
    return ItemList(items=[Item(**item.to_dict()) for item in items], total=total, offset=offset)


T = TypeVar("T")


async def _stored_or_404(rt: Runtime, read: Callable[[IndexBackend], T | None], detail: str) -> T:
    """Read one thing about an item off the event loop; 404 with ``detail`` when it is absent."""
    store = rt.open_index()
    found = await anyio.to_thread.run_sync(read, store)
    if found is None:
        raise HTTPException(404, detail)
    return found


@router.get(
    "/items/{item_id}",
    response_model=Item,
    responses=error_responses(404, 503),
    summary="One item's metadata",
)
async def get_item(rt: RuntimeDep, item_id: str) -> Item:
    detail = f"no item with id {item_id!r} in the index"
    item = await _stored_or_404(rt, lambda s: s.get(item_id), detail)
    return Item(**item.to_dict())


@router.get(
    "/items/{item_id}/thumbnail",
    response_class=Response,
    responses={
        **error_responses(404, 503),
        200: {"content": {"image/jpeg": {}}, "description": "small JPEG"},
    },
    summary="The item's stored JPEG thumbnail",
)
async def get_thumbnail(rt: RuntimeDep, item_id: str) -> Response:
    detail = f"no thumbnail for {item_id!r} (unknown id, or added without)"
    data = await _stored_or_404(rt, lambda s: s.thumbnail(item_id), detail)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


@router.delete(
    "/items/{item_id}",
    status_code=204,
    response_class=Response,
    dependencies=[Depends(require_token)],
    responses=error_responses(401, 404, 503),
    summary="Delete an item (durable once the response is sent)",
)
async def delete_item(rt: RuntimeDep, item_id: str) -> Response:
    store = rt.open_index()
    if not await anyio.to_thread.run_sync(store.delete, item_id):
        raise HTTPException(404, f"no item with id {item_id!r} in the index")
    return Response(status_code=204)


@router.get(
    "/index",
    response_model=dict[str, Any],
    responses=error_responses(503),
    summary="Index statistics",
)
async def index_stats(rt: RuntimeDep) -> dict[str, Any]:
    store = rt.open_index()
    stats = await anyio.to_thread.run_sync(store.stats)
    stats.pop("data_dir", None)  # a server path: not the client's business
    return stats
