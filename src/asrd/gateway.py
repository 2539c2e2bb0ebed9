"""The WebSocket gateway: accept loop, per-connection handshake, graceful shutdown.

Shaped like hypercorn's trio worker: the accept loop and the connection handlers live in
separate nurseries, so on shutdown we stop accepting, give running sessions a grace period,
then end the rest with a clear error. Every connection handler catches everything: one
connection's failure never reaches the server or another session.
"""

from __future__ import annotations

import logging
from functools import partial

import trio
import trio_websocket
from trio_websocket import ConnectionClosed

from asrd import reuseport
from asrd.bus import Bus
from asrd.clientstream import ClientStream
from asrd.config import Config
from asrd.control import ConnectInfo, ControlPlane
from asrd.dialects.alibaba import AlibabaCodec
from asrd.errors import AsrdError, NoWorkers, ShuttingDown, TooManyRequests, UnknownNamespace
from asrd.events import TaskFailed
from asrd.handshake import (
    HeadError,
    RequestHead,
    dedupe_head,
    http_response,
    parse_head,
)
from asrd.httpserve import Route, discard_body, open_listeners, read_head, respond, send_answer
from asrd.registry import WorkerRegistry
from asrd.reuseport import Reservation
from asrd.session import GatewayState, Session
from asrd.store.http import TOKEN_PATH, token_endpoint

log = logging.getLogger(__name__)

ALIBABA_PATH = "/ws/v1"
HANDSHAKE_TIMEOUT_S = 10.0


class Gateway:
    def __init__(self, config: Config, bus: Bus, control: ControlPlane) -> None:
        self.config = config
        self.registry = WorkerRegistry(
            bus, config.nats.subject_prefix, config.server.worker_timeout_s
        )
        self.state = GatewayState(config, bus, self.registry, control)
        m = self.state.metrics
        m.active.fn = lambda: self.state.active
        m.workers.fn = lambda: len(self.registry.all())
        # a draining worker takes no claims: its free decoders are none a session can get
        m.decoders_free.fn = lambda: sum(b.free for b in self.registry.all() if not b.draining)
        m.decoders_total.fn = lambda: sum(b.capacity for b in self.registry.all())
        m.nats_reconnects.fn = lambda: bus.reconnects
        m.nats_errors.fn = lambda: getattr(bus, "errors", 0)
        m.redis_errors.fn = lambda: getattr(control, "redis_errors", 0)  # 0: no Redis
        m.redis_reconnects.fn = lambda: getattr(control, "redis_reconnects", 0)
        self.stop_requested = trio.Event()
        self.listening = False  # /readyz: not before the port takes connections
        self.draining = False
        self.port = 0

    async def serve(
        self,
        *,
        wait_for_workers: int = 0,
        reservation: Reservation | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :attr:`stop_requested` is set, then drain and return.

        With a ``reservation`` (one of several gateway processes, asrd.reuseport) this process
        listens on the reserved port beside its siblings; without, on ``[server] port``.
        """
        server = self.config.server
        async with trio.open_nursery() as outer:
            await outer.start(self.registry.run)
            if wait_for_workers:
                await self._wait_for_workers(wait_for_workers)
            if reservation is None:
                listeners = await open_listeners(server.host, server.port)
            else:
                listeners = await reuseport.listen(reservation)
            self.port = listeners[0].socket.getsockname()[1]
            self.listening = True
            async with trio.open_nursery() as handlers:
                accept_scope = trio.CancelScope()

                async def accept() -> None:
                    with accept_scope:
                        await trio.serve_listeners(
                            partial(self._handle), listeners, handler_nursery=handlers
                        )

                handlers.start_soon(accept)
                log.info(
                    "asrd gateway listening on ws://%s:%d%s", server.host, self.port, ALIBABA_PATH
                )
                task_status.started(self.port)
                await self.stop_requested.wait()
                active = self.state.active
                log.info("draining: %d session%s running", active, "" if active == 1 else "s")
                self.draining = True
                accept_scope.cancel()
                await self._wait_idle(server.shutdown_grace_s)
                self.state.stop_sessions()
                await self._wait_idle(3.0)
                handlers.cancel_scope.cancel()
            outer.cancel_scope.cancel()
        log.info("gateway stopped")

    async def _wait_for_workers(self, n: int, timeout_s: float = 300.0) -> None:
        pool = self.config.server.default_language
        with trio.move_on_after(timeout_s):
            while len(self.registry.alive(pool)) < n:
                if self.stop_requested.is_set():  # SIGTERM or Ctrl-C while starting
                    raise ShuttingDown("stopped before the engine workers came up")
                await trio.sleep(0.05)
            return
        raise NoWorkers(f"only {len(self.registry.alive(pool))} of {n} workers came up")

    async def _wait_idle(self, timeout_s: float) -> None:
        with trio.move_on_after(timeout_s):
            if self.state.active:
                await self.state.idle.wait()

    # --- connections -----------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            await self._handle_connection(stream)
        # except*: the handshake runs in trio-websocket's nursery, which wraps what it raises
        # in an ExceptionGroup.
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client hung up
        except* Exception:
            log.exception("connection handler failed")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            parts = await read_head(stream, HANDSHAKE_TIMEOUT_S)
            if parts is None:
                return
            head = parse_head(parts[0])
        except HeadError as exc:
            await send_answer(stream, http_response(400, "Bad Request", f"{exc}\n".encode()))
            return
        if not head.is_websocket:
            if head.path == TOKEN_PATH:
                reply, read = await token_endpoint(self.state.control, stream, head, parts[1])
                if await send_answer(stream, reply) and not read:
                    await discard_body(stream, head, parts[1])
                return
            if await send_answer(stream, respond(self.health_routes(), head.path, head.method)):
                await discard_body(stream, head, parts[1])
            return
        if self.draining:
            await send_answer(stream, http_response(503, "Service Unavailable", b"draining\n"))
            return
        if (refused := head.upgrade_error()) is not None:
            status, reason = refused
            name = "Upgrade Required" if status == 426 else "Bad Request"
            extra = ["Sec-WebSocket-Version: 13"] if status == 426 else []
            await send_answer(
                stream, http_response(status, name, f"{reason}\n".encode(), headers=extra)
            )
            return
        limit = max(self.config.server.max_frame_bytes, self.config.server.max_text_bytes)
        wrapped = ClientStream(stream, dedupe_head(parts[0]), parts[1])
        async with trio.open_nursery() as nursery:
            # A request that wsproto refuses after all gets its answer from trio-websocket,
            # which then never returns the connection: the deadline ends the wait.
            ws: trio_websocket.WebSocketConnection | None = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                request = await trio_websocket.wrap_server_stream(
                    nursery, wrapped, message_queue_size=4, max_message_size=4 * limit
                )
                ws = await request.accept()
            if ws is not None:
                await self._session(ws, head)
            nursery.cancel_scope.cancel()

    async def _session(self, ws: trio_websocket.WebSocketConnection, head: RequestHead) -> None:
        codec = AlibabaCodec(max_text_bytes=self.config.server.max_text_bytes)
        token = (head.header(b"x-nls-token") or b"").decode("latin-1") or head.query("token")
        connect = ConnectInfo(head.method, head.path, head.query_dict(), token)
        # Refused after the upgrade, as TaskFailed: an HTTP error on the upgrade reaches SDK
        # users only as an unexplained close.
        if head.path != ALIBABA_PATH:
            shown = head.path if len(head.path) <= 60 else head.path[:60] + "..."
            await self._refuse(
                ws, codec, UnknownNamespace(f"unknown path {shown!r}: use {ALIBABA_PATH}")
            )
            return
        if self.state.active >= self.config.server.max_sessions:
            err = TooManyRequests(
                f"this gateway already runs {self.config.server.max_sessions} sessions"
            )
            await self._refuse(ws, codec, err)
            return
        session = Session(self.state, ws, codec, connect)
        self.state.session_started(session)
        try:
            await session.run()
        finally:
            self.state.session_ended(session)

    async def _refuse(
        self, ws: trio_websocket.WebSocketConnection, codec: AlibabaCodec, err: AsrdError
    ) -> None:
        """End a connection that gets no session: TaskFailed, counted by its code."""
        self.state.metrics.sessions.inc(1, str(err.code))
        await ws.send_message(codec.render(TaskFailed(err.code, err.reason)))
        await ws.aclose()

    def health_routes(self) -> dict[str, Route]:
        """/metrics, /healthz and /readyz: on the gateway's port, and on its own metrics port
        (:func:`asrd.httpserve.serve_http`) when ``[server] metrics_port`` is set."""

        def ready() -> tuple[int, bytes]:
            ok = self.listening and self.state.bus.connected and not self.draining
            return (200, b"ready\n") if ok else (503, b"not ready\n")

        return {
            "/metrics": lambda: (200, self.state.metrics.registry.render()),
            "/healthz": lambda: (200, b"ok\n"),
            "/readyz": ready,
        }
