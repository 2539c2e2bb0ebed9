"""A minimal HTTP/1.1 server for the health and metrics endpoints of each process.

GET and HEAD only (405 for other methods), one response per connection; parsing shared with
the gateway (asrd.handshake).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import trio

from asrd.errors import CannotListen
from asrd.handshake import HeadError, RequestHead, http_response, parse_head, split_head

log = logging.getLogger(__name__)

Route = Callable[[], tuple[int, bytes]]
ALLOW = "GET, HEAD"
# The time a client gets to send its request head, and then the body it declared.
TIMEOUT_S = 5.0
# The most of an unread body read before closing: as much as Go's net/http discards.
MAX_DISCARD_BYTES = 256 * 1024
_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
    400: "Bad Request",
}


async def serve_http(
    host: str,
    port: int,
    routes: dict[str, Route],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await open_listeners(host, port)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_listeners, partial(_handle, routes), listeners))
        task_status.started(bound)


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners``, with a port in use (or below 1024 without the capability)
    as :class:`~asrd.errors.CannotListen`."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise CannotListen(f"cannot listen on {host or '*'}:{port}: {exc.strerror or exc}") from exc


def respond(routes: dict[str, Route], path: str, method: str = "GET") -> bytes:
    """The whole HTTP response of the route for ``path`` (404 for none) to ``method``: HEAD
    gets GET's status and headers without the body (RFC 9110 §9.3.2), other methods 405."""
    route = routes.get(path)
    if route is None:
        status, body = 404, f"unknown path {path}\n".encode()
    elif method not in ("GET", "HEAD"):
        status, body = 405, f"method not allowed: use {ALLOW}\n".encode()
    else:
        status, body = route()
    ctype = "text/plain; version=0.0.4" if path == "/metrics" else "text/plain"
    return http_response(
        status,
        _REASONS.get(status, ""),
        body,
        ctype,
        headers=[f"Allow: {ALLOW}"] if status == 405 else [],
        head_only=method == "HEAD",
    )


async def read_head(stream: trio.abc.Stream, timeout_s: float) -> tuple[bytes, bytes] | None:
    """``(head, bytes after it)`` of an HTTP request; None on EOF or timeout."""
    buffer = b""
    with trio.move_on_after(timeout_s):
        while (parts := split_head(buffer)) is None:
            data = await stream.receive_some(4096)
            if not data:
                return None
            buffer += data
        return parts
    return None


def unread_body(head: RequestHead, received: int) -> int | None:
    """Bytes of the request body not yet read, ``received`` of them read past the head: 0 for
    none, None when the client did not declare its length (Transfer-Encoding, bad value)."""
    if head.header(b"transfer-encoding") is not None:
        return None
    raw = head.header(b"content-length")
    if raw is None:
        return 0
    if not raw.isdigit() or len(raw) > 18:  # past any real body; int() refuses 4300 digits
        return None
    return max(0, int(raw) - received)


async def discard_body(
    stream: trio.abc.HalfCloseableStream, head: RequestHead, already: bytes
) -> None:
    """Read and drop the body no route reads, before the connection closes: closing a socket
    with unread data sends an RST, which fails the client's send, or its read, and the
    response is lost. ``already``: bytes read past the head. At most MAX_DISCARD_BYTES for
    TIMEOUT_S, so that no client holds the connection open."""
    remaining = unread_body(head, len(already))
    if remaining == 0:
        return
    await stream.send_eof()  # a FIN after the response: a client reading to EOF has it all
    budget = MAX_DISCARD_BYTES if remaining is None else min(remaining, MAX_DISCARD_BYTES)
    with trio.move_on_after(TIMEOUT_S):
        while budget > 0 and (data := await stream.receive_some(min(budget, 65536))):
            budget -= len(data)


async def send_answer(stream: trio.abc.Stream, response: bytes) -> bool:
    """Send a whole response within TIMEOUT_S; False if the client did not take it by then (a
    client that never reads would otherwise hold the connection and its buffers for good)."""
    with trio.move_on_after(TIMEOUT_S):
        await stream.send_all(response)
        return True
    return False


async def _handle(routes: dict[str, Route], stream: trio.SocketStream) -> None:
    try:
        parts = await read_head(stream, TIMEOUT_S)
        if parts is not None:
            head = parse_head(parts[0])
            if await send_answer(stream, respond(routes, head.path, head.method)):
                await discard_body(stream, head, parts[1])
    except (HeadError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("http handler failed")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()
