"""Dependencies shared by the route modules: the runtime, the bearer token, reading uploads."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, HTTPException, Request, UploadFile
from PIL import Image

from service.images import ImageError, ImageTooLarge, decode_image, read_upload
from service.runtime import Runtime

T = TypeVar("T")


def model_runtime(request: Request) -> Runtime:
    """The runtime once the model is loaded (the index may still be opening)."""
    rt: Runtime = request.app.state.runtime
    if not rt.model_ready:
        raise HTTPException(503, "not ready: the model is loading", {"Retry-After": "1"})
    return rt


def runtime(request: Request) -> Runtime:
    """The runtime once the model and the index are loaded; 503 (with the reason) until then."""
    rt = model_runtime(request)
    if not rt.ready:
        if rt.index_error:
            raise HTTPException(503, rt.index_error, {"Retry-After": "30"})
        raise HTTPException(
            503, "not ready: the index is being opened (replaying)", {"Retry-After": "1"}
        )
    return rt


ModelRuntimeDep = Annotated[Runtime, Depends(model_runtime)]
RuntimeDep = Annotated[Runtime, Depends(runtime)]


def require_token(request: Request) -> None:
    """When DINO_API_TOKEN is set, mutating endpoints need ``Authorization: Bearer <token>``."""
    token = request.app.state.runtime.settings.api_token
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise HTTPException(
            401,
            "this endpoint needs the header `Authorization: Bearer <token>` (DINO_API_TOKEN)",
            {"WWW-Authenticate": "Bearer"},
        )


async def read_images(
    rt: Runtime, uploads: list[UploadFile], prepare: Callable[[Image.Image], T]
) -> list[tuple[Image.Image, T]]:
    """Read every upload under the byte limit, then decode and ``prepare`` them off the event
    loop. Errors name the upload (index and file name) so the client knows which one failed."""
    s = rt.settings
    if not uploads:
        raise HTTPException(422, "send at least one image")
    if len(uploads) > s.max_images_per_request:
        raise ImageTooLarge(
            f"{len(uploads)} images in one request; the limit is {s.max_images_per_request} "
            "(DINO_MAX_IMAGES_PER_REQUEST)"
        )
    blobs: list[bytes] = []
    for i, upload in enumerate(uploads):
        try:
            blobs.append(await read_upload(upload, s.max_upload_bytes))
        except ImageError as exc:
            raise exc.named(_name(i, upload)) from None

    def work() -> list[tuple[Image.Image, T]]:
        out = []
        for i, (upload, blob) in enumerate(zip(uploads, blobs, strict=True)):
            try:
                img = decode_image(blob, s.max_image_pixels)
            except ImageError as exc:
                raise exc.named(_name(i, upload)) from None
            out.append((img, prepare(img)))
        return out

    return await anyio.to_thread.run_sync(work)


def _name(i: int, upload: UploadFile) -> str:
    return f"image {i}" + (f" ({upload.filename!r})" if upload.filename else "")
