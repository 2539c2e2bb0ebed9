"""NATS behind the trio-native :class:`~asrd.bus.Bus` interface.

nats-py is an asyncio library. It runs on one asyncio loop in a dedicated thread (design.md §3:
trio-asyncio costs 10x more per publish and patches asyncio process-wide). Publishing is
fire-and-forget into a bounded outbox drained in batches by the asyncio thread; requests and
subscription changes are awaited across the thread boundary; incoming messages are handed to
trio in batches. This is the only module that imports ``nats``, and nats exceptions become
:class:`~asrd.errors.BusError` subclasses here and nowhere else.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import nats
import nats.errors
import trio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription as NatsSubscription

from asrd.aiothread import AsyncioThread, open_asyncio_thread
from asrd.bus import BusTimeout, Msg, NoResponders, Subscription
from asrd.config import NatsConfig
from asrd.errors import BusError

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_OUTBOX = 100_000  # messages queued for the asyncio thread before publish() fails
DRAIN_TIMEOUT_S = 2.0  # an unsubscribe with drain=True waits this long for the round-trip


class NatsBus:
    def __init__(self, thread: AsyncioThread, nc: NatsClient, batch_s: float = 0.0) -> None:
        self._thread = thread
        self._batch_s = batch_s
        self._loop = thread.loop
        self._nc = nc
        self._trio_token = thread.trio_token
        self._outbox: collections.deque[tuple[str, bytes, str]] = collections.deque()
        self._publish_scheduled = False
        self._inbox: collections.deque[tuple[Subscription, Msg]] = collections.deque()
        self._deliver_scheduled = False
        self._subs: dict[int, NatsSubscription] = {}
        self._async_errors = 0  # counted on the asyncio thread
        self._trio_errors = 0  # counted on the trio thread: one writer each, no lost counts

    # --- trio side -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    @property
    def errors(self) -> int:
        """Every NATS failure: the client's error callbacks, batched publishes that failed,
        and calls that raised BusError (the outbox full, a subscribe, flush or request that
        failed; a request's timeout or lack of responders is an answer, not an error)."""
        return self._async_errors + self._trio_errors

    @property
    def reconnects(self) -> int:
        # nats-py counts a reconnect before it subscribes again, its callback only after a
        # round-trip: by then messages of the new connection may have been handed to us, and
        # whoever compares this count would take them for messages from before the gap.
        return int(self._nc.stats["reconnects"])

    def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        if len(self._outbox) >= MAX_OUTBOX:
            self._trio_errors += 1
            raise BusError("NATS outbox is full (the server is unreachable or too slow)")
        self._outbox.append((subject, data, reply))
        if not self._publish_scheduled:
            self._publish_scheduled = True
            self._loop.call_soon_threadsafe(self._schedule_drain)

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        msg = await self._call(self._after_outbox(self._nc.request(subject, data, timeout=timeout)))
        return bytes(msg.data)

    async def subscribe(
        self, subject: str, *, queue: str = "", max_pending: int = 1024
    ) -> Subscription:
        sub = Subscription(subject, max_pending)

        async def cb(m: NatsMsg) -> None:
            self._inbox.append((sub, Msg(m.subject, m.data, m.reply)))
            if not self._deliver_scheduled:
                self._deliver_scheduled = True
                try:
                    self._trio_token.run_sync_soon(self._deliver)
                except trio.RunFinishedError:
                    pass

        # Shielded, as is unsubscribe (both are bounded: nats-py only queues the SUB): a cancel
        # after nats-py subscribed would lose the handle, and the server would go on routing
        # messages to it (a queue group's claims to a subscription nobody reads).
        with trio.CancelScope(shield=True):
            nsub = await self._call(
                self._after_outbox(
                    self._nc.subscribe(
                        subject, queue=queue, cb=cb, pending_msgs_limit=max_pending * 4
                    )
                )
            )
        self._subs[id(sub)] = nsub
        return sub

    async def unsubscribe(self, sub: Subscription, *, drain: bool = False) -> None:
        if not drain:
            sub._mark_closed()
        nsub = self._subs.pop(id(sub), None)
        if nsub is not None:
            try:
                with trio.CancelScope(shield=True):  # bounded by DRAIN_TIMEOUT_S
                    await self._unsubscribe(nsub, drain)
            except BusError as exc:  # closed connection: the server forgets it anyway
                log.debug("unsubscribe %s: %s", sub.subject, exc)
        # After a drain the messages it let through were delivered before this (both go
        # through the trio token's FIFO queue): the receiver reads them, then the end.
        sub._mark_closed()

    async def _unsubscribe(self, nsub: NatsSubscription, drain: bool) -> None:
        if drain:  # after what we published: our own messages to it come back
            await self._call(self._after_outbox(self._drain_subscription(nsub)))
        else:
            await self._call(nsub.unsubscribe())

    async def flush(self, timeout: float = 2.0) -> None:
        await self._call(self._drain_then_flush(timeout))

    def publish_every(
        self, subject: str, make: Callable[[], bytes | None], interval_s: float
    ) -> Callable[[], None]:
        stopped = False
        loop = self._loop
        tick = 0  # of the beat scheduled last (see next_tick)

        def beat() -> None:  # on the asyncio thread
            nonlocal tick
            if stopped:
                return
            try:
                data = make()
            except Exception:
                log.exception("periodic message for %s not made", subject)
                data = None
            if data is not None:
                self._outbox.append((subject, data, ""))
                self._start_drain()
            tick = next_tick(loop.time(), interval_s, tick)
            loop.call_at(tick * interval_s, beat)

        def stop() -> None:
            nonlocal stopped
            stopped = True

        loop.call_soon_threadsafe(beat)
        return stop

    def _deliver(self) -> None:
        self._deliver_scheduled = False
        inbox = self._inbox
        while inbox:
            sub, msg = inbox.popleft()
            sub.deliver(msg)

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the asyncio thread; nats exceptions become BusError here."""
        try:
            return await self._thread.run(coro)
        except nats.errors.NoRespondersError as exc:
            raise NoResponders("no responders") from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise BusTimeout("NATS request timed out") from exc
        except (nats.errors.Error, OSError, concurrent.futures.CancelledError) as exc:
            self._trio_errors += 1
            raise BusError(f"NATS: {exc!r}") from exc

    # --- asyncio side ----------------------------------------------------------------------

    def _schedule_drain(self) -> None:
        if self._batch_s > 0:
            self._loop.call_later(self._batch_s, self._start_drain)
        else:
            self._start_drain()

    def _start_drain(self) -> None:
        self._publish_scheduled = False  # before the check: a publish after it schedules anew
        if self._outbox:  # else a request or flush published it already
            self._loop.create_task(self._drain())

    async def _after_outbox(self, coro: Coroutine[Any, Any, T]) -> T:
        """Publish what the outbox holds first: a request or subscription never overtakes a
        message published before it (a failover's close must reach a worker before the
        claim it races with)."""
        await self._drain()
        return await coro

    async def _drain(self) -> None:
        self._publish_scheduled = False
        outbox = self._outbox
        publish = self._nc.publish
        while outbox:
            subject, data, reply = outbox.popleft()
            try:
                await publish(subject, data, reply=reply)
            except nats.errors.Error as exc:
                self._async_errors += 1
                log.warning("NATS publish to %s failed: %r", subject, exc)

    async def _drain_subscription(self, nsub: NatsSubscription) -> None:
        """UNSUB, then a round-trip: what the server sent before it still reaches the callback.

        Not a guarantee for messages other connections publish meanwhile: the server may route
        one to us before it removes the subscription and write it after the PONG. Those are
        lost, as before; the drain only makes the window small (docs/engine-protocol.md)."""
        try:
            await asyncio.wait_for(nsub.drain(), DRAIN_TIMEOUT_S)  # type: ignore[no-untyped-call]
        finally:
            # A drain that failed (connection lost) leaves the subscription registered, and
            # nats-py would subscribe it again on reconnecting.
            self._nc._remove_sub(nsub._id)

    async def _drain_then_flush(self, timeout: float) -> None:
        await self._drain()
        await self._nc.flush(timeout=timeout)  # type: ignore[arg-type]


@asynccontextmanager
async def open_nats_bus(
    config: NatsConfig, url: str, *, name: str = "asrd", connect_timeout: float = 5.0
) -> AsyncIterator[NatsBus]:
    """Connect to NATS on a private asyncio thread; reconnects forever until closed."""
    nc = NatsClient()
    holder: list[NatsBus] = []

    closing = False

    async def disconnected() -> None:
        if closing:  # our own close: not worth a warning
            log.debug("NATS connection to %s closed", url)
        else:
            log.warning("NATS disconnected from %s", url)

    async def reconnected() -> None:
        log.warning("NATS reconnected to %s", nc.connected_url.netloc if nc.connected_url else url)

    last_error: list[Exception] = []

    async def error(exc: Exception) -> None:
        if holder:
            holder[0]._async_errors += 1
        last_error[:] = [exc]
        log.warning("NATS error: %r", exc)

    options: dict[str, Any] = {
        "servers": [url],
        "name": name,
        "connect_timeout": connect_timeout,
        "reconnect_time_wait": 0.25,
        "max_reconnect_attempts": -1,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        "error_cb": error,
        "pending_size": 64 * 1024 * 1024,
    }
    if config.user:
        options["user"] = config.user
        options["password"] = config.password
    if config.token:
        options["token"] = config.token
    if config.creds_file:
        options["user_credentials"] = config.creds_file
    async with open_asyncio_thread("asrd-nats") as thread:
        bus = NatsBus(thread, nc, config.publish_batch_ms / 1000)
        holder.append(bus)
        try:
            # nats-py retries a first connection forever (wrong credentials included): give
            # up after a while with the reason, so a misconfigured process says why and exits.
            with trio.move_on_after(2 * connect_timeout) as waited:
                await bus._call(nc.connect(**options))
            if waited.cancelled_caught:
                why = repr(last_error[0]) if last_error else "no answer"
                raise BusError(f"cannot connect to NATS at {url}: {why}")
        except BusError as exc:
            if exc.__cause__ is None:
                raise
            raise BusError(f"cannot connect to NATS at {url}: {exc.__cause__!r}") from exc
        try:
            yield bus
        finally:
            closing = True
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                try:
                    await bus._call(bus._drain_then_flush(1.0))
                    await bus._call(nc.close())
                except BusError:
                    pass


def next_tick(now: float, interval_s: float, last: int) -> int:
    """The next beat's time, in multiples of ``interval_s`` on the monotonic clock: the first
    after ``now`` and after ``last``. Every process of a host shares that clock, so all of its
    workers beat together and a gateway reads their beats in one wake-up instead of one each
    (an idle gateway with 14 workers: 8 ms of CPU a second instead of 17-25,
    docs/benchmarks.md). A late beat does not shift the ones after it, and one that asyncio
    runs a little early does not come twice."""
    return max(last + 1, math.floor(now / interval_s) + 1)
