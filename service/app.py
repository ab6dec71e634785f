"""The FastAPI application: factory, lifespan, error mapping, access log.

``create_app(settings)`` builds an app whose lifespan loads the model and opens the index; the
``Runtime`` it stores in ``app.state.runtime`` is what the routes use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from artifact import ArtifactError
from service import (
    routes_duplicates,
    routes_index,
    routes_model,
    routes_ops,
    routes_perceptual,
)
from service.batcher import Overloaded
from service.guards import RequestGuard, leaf_routes
from service.images import ImageError
from service.index import DuplicateIdError, IndexStoreError, InvalidItemError
from service.metrics import Metrics
from service.runtime import NotReady, Runtime
from service.settings import Settings, SettingsError

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")
STATIC_DIR = Path(__file__).parent / "static"


class AccessLog:
    """One log line and the request metrics per HTTP request (pure ASGI: no body buffering)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            # Route templates, not raw paths, keep the label set small (/items/{item_id}).
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.request(scope["method"], endpoint, status, elapsed)
            access_log.info(
                "%s %s %d %.1f ms",
                printable(scope["method"]),
                printable(scope["path"]),
                status,
                elapsed * 1000,
            )


def printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (``\\n``, ``\\x1b``):
    the path is percent-decoded client input, and a raw newline in it would forge a log line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class BodyLimit:
    """413 for request bodies over ``limit`` bytes: at once from Content-Length, or as soon as a
    streamed (chunked) body passes it. The first response sent wins; the app's own error for the
    aborted body is dropped."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"request body is over the limit of {self.limit} bytes (DINO_MAX_REQUEST_BYTES)"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await _error(413, detail)(scope, receive, send)
            return
        seen = 0
        responded = False

        async def guarded_send(message: Message) -> None:
            if not responded:
                await send(message)

        async def counted_receive() -> Message:
            nonlocal seen, responded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit and not responded:
                    await _error(413, detail)(scope, receive, send)
                    responded = True
                    raise BodyTooLarge(detail)
            return message

        with suppress(BodyTooLarge):
            await self.app(scope, counted_receive, guarded_send)


class BodyTooLarge(Exception):
    pass


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method the path supports. Starlette's 405 names only the first route matching the
    path (``Allow: POST`` on /items, though GET /items exists), which misleads clients."""
    scope = {**request.scope, "method": "\x00"}  # no route takes it: a path match is PARTIAL
    methods: set[str] = set()
    for route in leaf_routes(request.app.router.routes):
        if getattr(route, "methods", None) and route.matches(scope)[0] is Match.PARTIAL:
            methods |= set(route.methods)
    return ", ".join(sorted(methods))


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(ImageError)
    async def image_error(_: Request, exc: ImageError) -> JSONResponse:
        return _error(exc.status_code, exc.message)

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(NotReady)
    async def not_ready(_: Request, exc: NotReady) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(IndexStoreError)
    async def store_unavailable(_: Request, exc: IndexStoreError) -> JSONResponse:
        log.error("index store error: %s", exc)
        retry = str(settings.retry_after_s)
        return _error(503, f"index unavailable: {exc}", {"Retry-After": retry})

    @app.exception_handler(DuplicateIdError)
    async def duplicate(_: Request, exc: DuplicateIdError) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(InvalidItemError)
    async def invalid_item(_: Request, exc: InvalidItemError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # The contract's errors are one readable string, not FastAPI's list of objects.
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return _error(exc.status_code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await runtime.start()
        except (SettingsError, ArtifactError, IndexStoreError) as exc:
            # One readable line before uvicorn's traceback: these are configuration problems.
            log.error("cannot start: %s", exc)
            await runtime.stop()
            raise
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="DINO feature service",
        version="0.1.0",
        summary="Embeddings, attention maps and nearest neighbours from an exported DINO model.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    # Added innermost first: AccessLog sees every response, RequestGuard refuses before
    # BodyLimit or the routes read any of the body.
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(RequestGuard, settings=settings)
    app.add_middleware(AccessLog, metrics=runtime.metrics)
    _install_error_handlers(app, settings)
    for module in (routes_model, routes_index, routes_duplicates, routes_ops, routes_perceptual):
        app.include_router(module.router)
    if (STATIC_DIR / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")

    return app
