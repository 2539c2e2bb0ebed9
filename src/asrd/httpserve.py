"""A minimal HTTP/1.1 server for the health and metrics endpoints of each process.

GET only, one response per connection; parsing shared with the gateway (asrd.handshake).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import trio

from asrd.handshake import HeadError, http_response, parse_head, split_head

log = logging.getLogger(__name__)

Route = Callable[[], tuple[int, bytes]]
_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable", 400: "Bad Request"}


async def serve_http(
    host: str,
    port: int,
    routes: dict[str, Route],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_listeners, partial(_handle, routes), listeners))
        task_status.started(bound)


def respond(routes: dict[str, Route], path: str) -> bytes:
    """The whole HTTP response of the route for ``path`` (404 for none)."""
    route = routes.get(path)
    status, body = route() if route else (404, f"unknown path {path}\n".encode())
    ctype = "text/plain; version=0.0.4" if path == "/metrics" else "text/plain"
    return http_response(status, _REASONS.get(status, ""), body, ctype)


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


async def _handle(routes: dict[str, Route], stream: trio.SocketStream) -> None:
    try:
        parts = await read_head(stream, 5.0)
        if parts is not None:
            head = parse_head(parts[0])
            await stream.send_all(respond(routes, head.path))
    except (HeadError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        log.exception("http handler failed")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()
