"""Dependencies shared by the route modules: the runtime, the bearer token, reading uploads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, HTTPException, Request, UploadFile
from PIL import Image

from service.batcher import Overloaded
from service.guards import TOKEN_HELP, token_matches
from service.images import (
    BudgetBusy,
    ImageError,
    ImageTooLarge,
    load_rgb,
    open_image,
    read_limited,
)
from service.runtime import Runtime
from service.settings import Settings

T = TypeVar("T")
# How long a request waits for the server-wide decoding budget before its 503.
DECODE_WAIT_S = 30.0


def model_runtime(request: Request) -> Runtime:
    """The runtime once the model is loaded (the index may still be opening)."""
    rt: Runtime = request.app.state.runtime
    if not rt.model_ready:
        raise HTTPException(503, "not ready: the model is loading", retry_after(rt))
    return rt


def runtime(request: Request) -> Runtime:
    """The runtime once the model and the index are loaded; 503 (with the reason) until then."""
    rt = model_runtime(request)
    if not rt.ready:
        if rt.index_error:
            raise HTTPException(503, rt.index_error, retry_after(rt))
        raise HTTPException(
            503, "not ready: the index is being opened (replaying)", retry_after(rt)
        )
    return rt


def retry_after(rt: Runtime) -> dict[str, str]:
    """The ``Retry-After`` header every 503 carries (DINO_RETRY_AFTER_S)."""
    return {"Retry-After": str(rt.settings.retry_after_s)}


ModelRuntimeDep = Annotated[Runtime, Depends(model_runtime)]
RuntimeDep = Annotated[Runtime, Depends(runtime)]


def require_token(request: Request) -> None:
    """When DINO_API_TOKEN is set, the route needs ``Authorization: Bearer <token>``.

    ``RequestGuard`` makes the same check from the headers before the body is read; this one
    marks the route (OpenAPI, the guard finds it by ``needs_token``) and checks again."""
    token = request.app.state.runtime.settings.api_token
    if token and not token_matches(request.headers.get("authorization", ""), token):
        raise HTTPException(401, TOKEN_HELP, {"WWW-Authenticate": "Bearer"})


require_token.needs_token = True  # type: ignore[attr-defined]


async def read_images(
    rt: Runtime, uploads: list[UploadFile], prepare: Callable[[Image.Image], T]
) -> list[T]:
    """``prepare`` applied to each upload, decoded one at a time off the event loop.

    First every upload's bytes, type and header are checked (pixels per image and per request):
    a request over a limit is refused before any pixel is decoded. Then each image is decoded
    inside the server-wide budget and only ``prepare``'s (model-sized) result is kept, so one
    full-size decoded image per request is alive at a time. Errors name the upload."""
    s = rt.settings
    if not uploads:
        raise HTTPException(422, "send at least one image")
    if len(uploads) > s.max_images_per_request:
        raise ImageTooLarge(
            f"{len(uploads)} images in one request; the limit is {s.max_images_per_request} "
            "(DINO_MAX_IMAGES_PER_REQUEST)"
        )
    await anyio.to_thread.run_sync(_check_headers, s, uploads)
    out: list[T] = []
    for i, upload in enumerate(uploads):
        try:
            out.append(await _decode(rt, upload, prepare))
        except ImageError as exc:
            raise exc.named(_name(i, upload)) from None
        except BudgetBusy as exc:
            raise Overloaded(f"{exc}; retry in {s.retry_after_s} s", s.retry_after_s) from None
    return out


def _read(upload: UploadFile, max_bytes: int) -> bytes:
    upload.file.seek(0)
    return read_limited(upload.file, max_bytes)


def _check_headers(s: Settings, uploads: list[UploadFile]) -> None:
    """Bytes, type and pixels of every upload, and the pixels of all of them together."""
    total = 0
    for i, upload in enumerate(uploads):
        try:
            img = open_image(_read(upload, s.max_upload_bytes), s.max_image_pixels)
        except ImageError as exc:
            raise exc.named(_name(i, upload)) from None
        total += img.width * img.height
        img.close()
    if total > s.max_request_pixels:
        raise ImageTooLarge(
            f"these {len(uploads)} images have {total} pixels in all, over the limit of "
            f"{s.max_request_pixels} per request (DINO_MAX_REQUEST_PIXELS); send fewer or "
            "smaller images per request"
        )


@dataclass(frozen=True)
class _Waiting:
    """An opened image whose decoding waits for the server-wide budget."""

    img: Image.Image
    pixels: int


async def _decode(rt: Runtime, upload: UploadFile, prepare: Callable[[Image.Image], T]) -> T:
    """One upload through ``prepare``, inside the server-wide budget. The common case is one
    thread hop; when the budget is spent, the wait happens on the event loop, not in a thread."""
    budget, s = rt.decode_budget, rt.settings

    def finish(img: Image.Image) -> T:
        return prepare(load_rgb(img))

    def start() -> T | _Waiting:
        img = open_image(_read(upload, s.max_upload_bytes), s.max_image_pixels)
        pixels = img.width * img.height
        if not budget.try_acquire(pixels):
            return _Waiting(img, pixels)
        try:
            return finish(img)
        finally:
            budget.release(pixels)

    result = await anyio.to_thread.run_sync(start)
    if not isinstance(result, _Waiting):
        return result
    await budget.acquire(result.pixels, DECODE_WAIT_S)
    try:
        return await anyio.to_thread.run_sync(finish, result.img)
    finally:
        budget.release(result.pixels)


def _name(i: int, upload: UploadFile) -> str:
    return f"image {i}" + (f" ({upload.filename!r})" if upload.filename else "")
