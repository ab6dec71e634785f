"""Checks made from the request line and headers alone, before any body byte is read.

``RequestGuard`` (pure ASGI) refuses, in order:

1. a ``Host`` the server does not serve (400; DNS rebinding points a hostile name at a loopback
   server, and a browser then treats that server as the hostile site's own origin);
2. a cross-site browser request that could change state: any method but GET/HEAD/OPTIONS whose
   ``Sec-Fetch-Site`` is not ``same-origin``/``none``, or, without that header, whose ``Origin``
   is not the server's own (403; a page elsewhere cannot post forms through a user's browser);
3. without the bearer token, when ``DINO_API_TOKEN`` is set, a request for a route that needs
   it (401), so an unauthenticated upload is never read, parsed or spooled to disk.

Clients that are not browsers send neither ``Origin`` nor ``Sec-Fetch-Site`` and pass check 2.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service.settings import Settings

SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))
# Read-only operational endpoints answer any Host: probes and scrapers address the server by
# an IP the operator cannot always list (a pod's address).
OPS_PATHS = frozenset(("/healthz", "/readyz", "/metrics"))
TOKEN_HELP = "this endpoint needs the header `Authorization: Bearer <token>` (DINO_API_TOKEN)"


def token_matches(authorization: str, token: str) -> bool:
    """``Bearer <token>`` (scheme in any case), compared in constant time."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


def leaf_routes(routes: list) -> Iterator:
    """Routes with methods, inside included routers too (FastAPI >= 0.160 wraps an included
    router in one route; the routers here have no prefix, so their paths are the app's)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from leaf_routes(inner.routes) if inner is not None else (route,)


def needs_token(route: object) -> bool:
    """Whether a route declares the ``require_token`` dependency."""
    return any(
        getattr(dep.dependency, "needs_token", False) for dep in getattr(route, "dependencies", ())
    )


def split_host(value: str) -> str:
    """``Host`` header -> lower-case name without the port (``[::1]:8000`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    name, sep, port = value.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else value


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    if "*" in allowed:
        return True
    name = split_host(host)
    return any(
        name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:]))
        for pattern in allowed
    )


def _origin_netloc(origin: str) -> str | None:
    try:
        parts = urlsplit(origin)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    try:
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return host if port in (None, default) else f"{host}:{port}"


def cross_site(headers: dict[str, str], allowed_origins: list[str]) -> str | None:
    """Why a state-changing request is cross-site, or None when it may go on."""
    origin = headers.get("origin")
    if origin is not None and ("*" in allowed_origins or origin in allowed_origins):
        return None
    site = headers.get("sec-fetch-site")
    if site is not None:
        if site in ("same-origin", "none"):
            return None
        return f"a {site} request (Sec-Fetch-Site) from origin {origin!r}"
    if origin is None:
        return None  # not a browser (curl, SDKs): nothing to refuse
    own = headers.get("host", "").strip().lower()
    own = own[:-3] if own.endswith(":80") else own
    if _origin_netloc(origin) in (own, own.removesuffix(":443")):
        return None
    return f"origin {origin!r} is not this server's"


def _json(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class RequestGuard:
    """Host, cross-site and token checks from the headers (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.hosts = settings.host_names()
        self.origins = list(settings.allowed_origins)
        self.token = settings.api_token or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            # Close the connection: a body sent after the refusal is not even drained.
            refusal.headers["Connection"] = "close"
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> JSONResponse | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        ops = method in SAFE_METHODS and scope["path"] in OPS_PATHS
        if not ops and not host_allowed(headers.get("host", ""), self.hosts):
            return _json(
                400,
                f"Host {split_host(headers.get('host', ''))!r} is not served here; the "
                "operator can add it to DINO_ALLOWED_HOSTS",
            )
        if method not in SAFE_METHODS:
            why = cross_site(headers, self.origins)
            if why is not None:
                return _json(
                    403,
                    f"cross-site request refused: {why}; a page on another origin may change "
                    "the index only if the operator lists it in DINO_ALLOWED_ORIGINS",
                )
        authorised = not self.token or token_matches(headers.get("authorization", ""), self.token)
        if not authorised and self._route_needs_token(scope):
            return _json(401, TOKEN_HELP, {"WWW-Authenticate": "Bearer"})
        return None

    @staticmethod
    def _route_needs_token(scope: Scope) -> bool:
        app = scope.get("app")
        routes = getattr(getattr(app, "router", None), "routes", [])
        for route in leaf_routes(routes):
            if needs_token(route) and route.matches(scope)[0] is Match.FULL:
                return True
        return False
