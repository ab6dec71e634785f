"""The load generator's HTTP/1.1 client against real servers on loopback: a small asyncio server
that answers with each framing the client must read, and the service itself."""

from __future__ import annotations

import asyncio
import json

import pytest
from live_server import Server

from benchmarks.httpclient import Connection, HttpError, encode_request, multipart


class Recorder:
    """A loopback HTTP server answering each request with a scripted framing; it records the
    bodies it receives and how many connections were opened."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers, self.bodies, self.connections = answers, [], 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                self.bodies.append(await reader.readexactly(length))
                answer = self.answers.pop(0)
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer.lower() or answer.endswith(b"EOF-FRAMED"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _serve(recorder: Recorder):
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_framings_keep_alive_and_reconnect():
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
        b"HTTP/1.1 503 Busy\r\nRetry-After: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n\r\nEOF-FRAMED",
    ]
    recorder = Recorder(answers)

    async def main() -> list:
        server, port = await _serve(recorder)
        async with server:
            conn = Connection("127.0.0.1", port, timeout=5)
            body, ctype = multipart([("images", "a.jpg", b"\xff\xd8\xff"), ("k", None, "5")])
            raw = encode_request("POST", "/embed", f"127.0.0.1:{port}", body, ctype)
            out = [await conn.request(raw) for _ in range(4)]
            conn.close()
            return out

    first, second, third, fourth = asyncio.run(main())
    assert (first.status, first.body, first.headers["x-a"]) == (200, b"hello", "1")
    assert (second.status, second.body, second.headers["retry-after"]) == (503, b"abcde", "2")
    assert (third.status, third.body) == (201, b"ok")
    assert (fourth.status, fourth.body) == (200, b"EOF-FRAMED")
    # Keep-alive for the first three, a new connection after "Connection: close".
    assert recorder.connections == 2
    sent = recorder.bodies[0]
    assert b'name="images"; filename="a.jpg"' in sent and b"\xff\xd8\xff" in sent
    assert b'name="k"\r\n\r\n5\r\n' in sent and sent.endswith(b"--\r\n")


def test_an_idle_connection_closed_by_the_server_is_reopened_once():
    recorder = Recorder([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"])

    async def main():
        server, port = await _serve(recorder)
        async with server:
            conn = Connection("127.0.0.1", port, timeout=5)
            raw = encode_request("GET", "/", "h")
            first = await conn.request(raw)  # the server then drops the connection (no answers)
            await asyncio.sleep(0.05)
            recorder.answers.append(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
            second = await conn.request(raw)
            conn.close()
            return first, second

    first, second = asyncio.run(main())
    assert (first.body, second.body) == (b"a", b"b") and recorder.connections == 2


def test_failures_are_typed():
    async def refused() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        await Connection("127.0.0.1", port, timeout=5).request(encode_request("GET", "/", "h"))

    with pytest.raises(HttpError, match="ConnectionRefused"):
        asyncio.run(refused())

    async def garbage() -> None:
        recorder = Recorder([b"SSH-2.0-nope\r\n\r\n"])
        server, port = await _serve(recorder)
        async with server:
            await Connection("127.0.0.1", port, timeout=5).request(encode_request("GET", "/", "h"))

    with pytest.raises(HttpError, match="not an HTTP/1.x status line"):
        asyncio.run(garbage())


def test_against_the_live_service(tiny_vit_dir, tmp_path):
    """Pre-encoded /embed requests on one keep-alive connection get the service's JSON."""
    from service_helpers import photo_bytes

    server = Server(tiny_vit_dir, tmp_path / "data", tmp_path / "server.log")
    try:
        server.wait_ready()
        port = int(server.url.rsplit(":", 1)[1])
        body, ctype = multipart([("images", "0.jpg", photo_bytes(0))])
        raw = encode_request("POST", "/embed", f"127.0.0.1:{port}", body, ctype)

        async def main():
            conn = Connection("127.0.0.1", port, timeout=30)
            try:
                return [await conn.request(raw) for _ in range(3)]
            finally:
                conn.close()

        answers = asyncio.run(main())
    finally:
        server.stop()
    for answer in answers:
        assert answer.status == 200, answer.body[:300]
        data = json.loads(answer.body)
        assert data["dim"] == 192 and len(data["embeddings"]) == 1
    assert answers[0].body == answers[2].body  # same image, same embedding
