"""An in-process :class:`~asrd.bus.Bus` for fast unit tests (never for integration tests)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable

import trio

from asrd.bus import BusTimeout, Msg, NoResponders, Subscription


def _matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


class InMemoryBus:
    def __init__(self) -> None:
        self._subs: list[tuple[str, str, Subscription]] = []
        self._rr: dict[tuple[str, str], int] = defaultdict(int)
        self._inbox = itertools.count()

    @property
    def connected(self) -> bool:
        return True

    @property
    def reconnects(self) -> int:
        return 0

    def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        msg = Msg(subject, data, reply)
        groups: dict[str, list[Subscription]] = defaultdict(list)
        for pattern, queue, sub in list(self._subs):
            if _matches(pattern, subject):
                if queue:
                    groups[queue].append(sub)
                else:
                    sub.deliver(msg)
        for queue, members in groups.items():
            n = self._rr[(subject, queue)]
            self._rr[(subject, queue)] = n + 1
            members[n % len(members)].deliver(msg)

    def _has_subscriber(self, subject: str) -> bool:
        return any(_matches(p, subject) for p, _, _ in self._subs)

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        if not self._has_subscriber(subject):
            raise NoResponders(f"no responders on {subject}")
        inbox = f"_INBOX.{next(self._inbox)}"
        sub = await self.subscribe(inbox, max_pending=1)
        try:
            self.publish(subject, data, reply=inbox)
            with trio.move_on_after(timeout):
                return (await sub.receive()).data
            raise BusTimeout(f"no reply on {subject} within {timeout} s")
        finally:
            await self.unsubscribe(sub)

    async def subscribe(
        self, subject: str, *, queue: str = "", max_pending: int = 1024
    ) -> Subscription:
        sub = Subscription(subject, max_pending)
        self._subs.append((subject, queue, sub))
        return sub

    async def unsubscribe(self, sub: Subscription, *, drain: bool = False) -> None:
        # Delivery is synchronous here: nothing is ever on its way, so drain changes nothing.
        self._subs = [t for t in self._subs if t[2] is not sub]
        sub._mark_closed()

    async def flush(self, timeout: float = 2.0) -> None:
        await trio.lowlevel.checkpoint()

    def publish_every(
        self, subject: str, make: Callable[[], bytes | None], interval_s: float
    ) -> Callable[[], None]:
        stopped = False

        async def beat() -> None:
            while not stopped:
                data = make()
                if data is not None:
                    self.publish(subject, data)
                await trio.sleep(interval_s)

        def stop() -> None:
            nonlocal stopped
            stopped = True

        trio.lowlevel.spawn_system_task(beat)
        return stop
