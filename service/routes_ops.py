"""Operational endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from service.index import IndexStoreError
from service.metrics import CONTENT_TYPE
from service.runtime import Runtime
from service.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "model or index not loaded yet"}},
    summary="Readiness: the model and the index are loaded",
)
async def readyz(request: Request) -> Readiness | JSONResponse:
    rt: Runtime = request.app.state.runtime
    if not rt.ready or rt.manifest is None:
        detail = (
            rt.index_error
            or rt.index_waiting
            or ("opening the index (replaying)" if rt.model_ready else "loading the model")
        )
        model = rt.manifest.name if rt.manifest else None
        body = Readiness(ready=False, model=model, detail=detail)
        retry = {"Retry-After": str(rt.settings.retry_after_s)}
        return JSONResponse(body.model_dump(), status_code=503, headers=retry)
    try:  # a shared index database may have gone away since start: say so, and retry later
        size = await anyio.to_thread.run_sync(rt.index_size)
    except IndexStoreError as exc:
        body = Readiness(ready=False, model=rt.manifest.name, detail=str(exc))
        retry = {"Retry-After": str(rt.settings.retry_after_s)}
        return JSONResponse(body.model_dump(), status_code=503, headers=retry)
    return Readiness(ready=True, model=rt.manifest.name, index_size=size)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> PlainTextResponse:
    rt: Runtime = request.app.state.runtime
    return PlainTextResponse(rt.metrics.render(), media_type=CONTENT_TYPE)
