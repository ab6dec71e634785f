"""A small HTTP/1.1 keep-alive client over asyncio streams, for the load generator.

Why not httpx: the load generator runs on the same 2 cores as the server it measures, and httpx
spends ~3-4 ms of CPU per /embed request (multipart encoding, its connection pool, h11), a tenth of
what OpenVINO needs per image; that CPU is taken from the server and shows up as "server overhead".
Here a request is bytes built once (``encode_request``, ``multipart``) and written as they are; an
answer is read with Content-Length or chunked framing. Loopback use only (see ``loadgen``).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

_MAX_HEAD = 64 * 1024


class HttpError(Exception):
    """The connection failed or the answer was not valid HTTP/1.1."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes


def multipart(parts: list[tuple[str, str | None, str | bytes]]) -> tuple[bytes, str]:
    """``multipart/form-data`` body and its content type from ``(name, filename, value)`` parts;
    a part with a file name is sent as ``application/octet-stream`` bytes (the server sniffs)."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}"
        if filename is not None:
            head += f'; filename="{filename}"\r\nContent-Type: application/octet-stream'
        data = value.encode() if isinstance(value, str) else value
        chunks += [head.encode(), b"\r\n\r\n", data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def encode_request(
    method: str,
    path: str,
    host: str,
    body: bytes = b"",
    content_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """The full request (head and body) as bytes, ready to send again and again."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """One keep-alive connection; requests on it go one at a time (a closed-loop client)."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> Answer:
        """Send ``raw`` (from ``encode_request``) and read the answer. A keep-alive connection the
        server closed while idle is reopened once, as browsers and httpx do; any other failure
        raises ``HttpError`` (or ``TimeoutError``) and leaves the connection closed."""
        reused = self._writer is not None
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    return await self._exchange(raw)
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    self.close()
                    if not reused or getattr(exc, "partial", b""):
                        raise
                return await self._exchange(raw)  # once more, on a fresh connection
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    async def _exchange(self, raw: bytes) -> Answer:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        self._writer.write(raw)
        await self._writer.drain()
        try:
            head = await self._reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise HttpError("response head too long") from exc
        status, headers = _parse_head(head)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked()
        elif "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:  # framed by the end of the connection
            body = await self._reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Answer(status, headers, body)

    async def _chunked(self) -> bytes:
        assert self._reader is not None
        parts = []
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while await self._reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    if len(head) > _MAX_HEAD:
        raise HttpError("response head too long")
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest.partition(" ")[0]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise HttpError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError(f"bad header line: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
    return int(code), headers
