"""The message bus between gateways and engine workers.

``Bus`` is trio-native. :mod:`asrd.bus.natsbus` is the only module that imports ``nats``;
:mod:`asrd.bus.memory` is an in-process fake for fast unit tests. Subjects are documented in
``docs/engine-protocol.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from asrd.errors import BusError


class NoResponders(BusError):
    """Nobody subscribes to the subject of a request (e.g. every worker of a pool is full)."""


class BusTimeout(BusError):
    """A request got no reply in time."""


@dataclass(frozen=True, slots=True)
class Msg:
    subject: str
    data: bytes
    reply: str = ""


class Subscription:
    """Messages of one subscription, delivered through a bounded trio channel.

    When the consumer falls more than ``max_pending`` messages behind, the subscription is
    marked overflowed and the next ``receive`` raises :class:`BusError`: a slow consumer gets a
    clear error instead of unbounded memory.
    """

    def __init__(self, subject: str, max_pending: int) -> None:
        self.subject = subject
        self._send, self._recv = trio.open_memory_channel[Msg](max_pending)
        self._overflowed = False
        self._closed = False

    def deliver(self, msg: Msg) -> None:
        """Called in the trio thread by the bus; never blocks."""
        if self._closed:
            return
        try:
            self._send.send_nowait(msg)
        except trio.WouldBlock:
            self._overflowed = True
            self._send.close()
        except trio.ClosedResourceError:
            pass

    @property
    def pending(self) -> int:
        """Messages delivered and not yet received: the consumer's backlog."""
        return self._recv.statistics().current_buffer_used

    async def receive(self) -> Msg:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            if self._overflowed:
                raise BusError(f"consumer of {self.subject} fell too far behind") from None
            raise BusError(f"subscription to {self.subject} was closed") from None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Msg:
        return await self.receive()

    def _mark_closed(self) -> None:
        self._closed = True
        self._send.close()


class Bus(Protocol):
    def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        """Fire-and-forget: queue the message and return at once (no round-trip)."""

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        """Send and wait for the first reply; NoResponders/BusTimeout/BusError on failure."""

    async def subscribe(
        self, subject: str, *, queue: str = "", max_pending: int = 1024
    ) -> Subscription:
        """Subscribe; ``receive`` on the result. Neither this nor ``unsubscribe`` is cancelled
        half-way: a subscription the server keeps but the caller never got would take a queue
        group's messages and nobody would read them."""

    async def unsubscribe(self, sub: Subscription, *, drain: bool = False) -> None:
        """Stop the subscription. With ``drain``, messages the server sent before it learnt
        of this are still delivered, then ``receive`` ends: a queue-group member that leaves
        answers the requests already on their way to it instead of dropping them."""

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait until everything published so far has reached the server."""

    def publish_every(
        self, subject: str, make: Callable[[], bytes | None], interval_s: float
    ) -> Callable[[], None]:
        """Publish ``make()`` every ``interval_s`` (skipping a beat when it returns None)
        until the returned function is called. For heartbeats: the NATS bus calls ``make``
        on its own I/O thread, so a busy event loop does not silence them, and at the
        multiples of ``interval_s`` on the monotonic clock (``natsbus.next_tick``)."""

    @property
    def connected(self) -> bool: ...

    @property
    def reconnects(self) -> int:
        """How often the connection was re-established (messages in flight may be lost)."""


def session_in(prefix: str, session_id: str) -> str:
    return f"{prefix}.session.{session_id}.in"


def session_out(prefix: str, session_id: str) -> str:
    return f"{prefix}.session.{session_id}.out"


def claim_subject(prefix: str, pool: str) -> str:
    return f"{prefix}.claim.{pool}"


def heartbeat_subject(prefix: str) -> str:
    return f"{prefix}.heartbeat"
