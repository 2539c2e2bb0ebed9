"""The health and metrics server (asrd.httpserve), against a real server on a loopback port."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pytest
import trio

from asrd import httpserve
from asrd.handshake import parse_head
from asrd.httpserve import Route, serve_http, unread_body

GUARD_S = 30
METRICS = b"asrd_sessions_active 3\n"


@dataclass
class Routes:
    """The three routes of every process, counting the calls: a 405 must not run its route."""

    ready: bool = True
    calls: list[str] = field(default_factory=list)

    def table(self) -> dict[str, Route]:
        def metrics() -> tuple[int, bytes]:
            self.calls.append("/metrics")
            return 200, METRICS

        def readyz() -> tuple[int, bytes]:
            self.calls.append("/readyz")
            return (200, b"ready\n") if self.ready else (503, b"not ready\n")

        return {"/metrics": metrics, "/healthz": lambda: (200, b"ok\n"), "/readyz": readyz}


@pytest.fixture
def routes() -> Routes:
    return Routes()


@pytest.fixture
async def port(nursery: trio.Nursery, routes: Routes) -> int:
    return int(await nursery.start(serve_http, "127.0.0.1", 0, routes.table()))


async def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` whole, then read to a clean EOF (a reset raises BrokenResourceError)."""
    with trio.fail_after(GUARD_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            response = b""
            while data := await stream.receive_some(65536):
                response += data
            return response


def split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    """``(status line, headers by lower-cased name, body)``."""
    head, sep, body = response.partition(b"\r\n\r\n")
    assert sep, response
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, {k.lower(): v for k, v in headers.items()}, body


def request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{length}{extra}\r\n".encode() + body


async def test_get_answers_the_route(port: int) -> None:
    status, headers, body = split(await exchange(port, request("GET", "/metrics")))
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "text/plain; version=0.0.4"
    assert headers["content-length"] == str(len(METRICS))
    assert body == METRICS
    status, _, body = split(await exchange(port, request("GET", "/nope")))
    assert (status, body) == ("HTTP/1.1 404 Not Found", b"unknown path /nope\n")


@pytest.mark.parametrize("ready", [True, False])
@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/nope"])
async def test_head_answers_the_status_and_headers_of_get_without_body(
    port: int, routes: Routes, path: str, ready: bool
) -> None:
    routes.ready = ready  # False: /readyz answers 503
    get = await exchange(port, request("GET", path))
    head = await exchange(port, request("HEAD", path))
    assert head == get.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"  # Content-Length: GET's body's
    assert split(head)[1]["content-length"] == str(len(split(get)[2]))


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "get"])
@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
async def test_other_methods_get_405_with_allow(
    port: int, routes: Routes, method: str, path: str
) -> None:
    status, headers, body = split(await exchange(port, request(method, path)))
    assert status == "HTTP/1.1 405 Method Not Allowed"
    assert headers["allow"] == "GET, HEAD"
    assert headers["content-length"] == str(len(body))
    assert routes.calls == []  # not run: a POST to /metrics renders nothing


@pytest.mark.parametrize(
    ("method", "extra"),
    [("POST", ""), ("PUT", ""), ("GET", ""), ("POST", "Expect: 100-continue\r\n")],
)
async def test_an_unread_body_does_not_reset_the_response(
    port: int, method: str, extra: str
) -> None:
    """More body than the server's first read: closing with it unread sent an RST instead of
    a FIN, and the client's read failed with ECONNRESET (its send, for larger bodies)."""
    response = await exchange(port, request(method, "/metrics", b"x" * 64 * 1024, extra))
    status, _, _ = split(response)
    assert status == ("HTTP/1.1 200 OK" if method == "GET" else "HTTP/1.1 405 Method Not Allowed")


async def test_a_chunked_body_does_not_reset_the_response(port: int) -> None:
    chunks = b"".join(b"1000\r\n" + b"y" * 0x1000 + b"\r\n" for _ in range(16)) + b"0\r\n\r\n"
    extra = "Transfer-Encoding: chunked\r\n"
    status, headers, _ = split(
        await exchange(port, request("POST", "/healthz", extra=extra) + chunks)
    )
    assert (status, headers["allow"]) == ("HTTP/1.1 405 Method Not Allowed", "GET, HEAD")


async def test_a_client_streaming_a_body_forever_is_cut_off(port: int) -> None:
    """The server discards a bounded part of a body, then closes: the client's send fails."""
    declared = 1 << 30
    sent = 0
    with trio.fail_after(GUARD_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                request("POST", "/metrics", extra=f"Content-Length: {declared}\r\n")
            )
            with pytest.raises(trio.BrokenResourceError):
                while True:
                    await stream.send_all(b"z" * 65536)
                    sent += 65536
    assert sent < 64 * 1024 * 1024  # the discarded part and the socket buffers, far from 1 GiB


async def test_a_client_that_never_sends_its_body_is_closed(
    monkeypatch: pytest.MonkeyPatch, port: int
) -> None:
    """The server waits TIMEOUT_S for a declared body, then closes: a send then meets an RST."""
    monkeypatch.setattr(httpserve, "TIMEOUT_S", 0.05)
    with trio.fail_after(GUARD_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request("POST", "/metrics", extra="Content-Length: 1000\r\n"))
            response = b""
            while data := await stream.receive_some(65536):  # the server's FIN ends the response
                response += data
            assert split(response)[0] == "HTTP/1.1 405 Method Not Allowed"
            with pytest.raises(trio.BrokenResourceError):
                while True:  # a byte at a time: the declared 1000 are never all sent
                    await stream.send_all(b"z")
                    await trio.sleep(0.01)


@pytest.mark.parametrize(
    ("headers", "received", "unread"),
    [
        ("", 0, 0),
        ("Content-Length: 0\r\n", 0, 0),
        ("Content-Length: 10\r\n", 4, 6),
        ("Content-Length: 10\r\n", 12, 0),  # a pipelined request after the body
        ("Transfer-Encoding: chunked\r\n", 0, None),
        ("Content-Length: -1\r\n", 0, None),
        ("Content-Length: ten\r\n", 0, None),
        ("Content-Length: " + "9" * 5000 + "\r\n", 0, None),  # int() would raise
    ],
)
def test_unread_body(headers: str, received: int, unread: int | None) -> None:
    head = parse_head(f"POST /metrics HTTP/1.1\r\n{headers}\r\n".encode())
    assert unread_body(head, received) == unread


async def test_a_client_that_does_not_read_the_answer_is_let_go(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends its request and never reads held the connection for good, the
    server blocked in its send: now the send gives up after TIMEOUT_S and the connection
    closes, with only what the socket buffers took delivered."""
    monkeypatch.setattr(httpserve, "TIMEOUT_S", 0.05)
    body = b"m" * (32 << 20)  # well beyond what the two sockets' buffers hold
    port = int(await nursery.start(serve_http, "127.0.0.1", 0, {"/metrics": lambda: (200, body)}))
    with trio.fail_after(GUARD_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request("GET", "/metrics"))
            await trio.sleep(0.5)  # not reading, well past the server's 0.05 s
            received = 0
            with contextlib.suppress(trio.BrokenResourceError):
                while data := await stream.receive_some(1 << 20):
                    received += len(data)
    assert 0 < received < len(body)
