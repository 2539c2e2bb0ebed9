"""The gateway's view of the engine workers, built from their heartbeats.

A worker that has not been heard from for ``timeout_s`` is declared dead: its sessions learn of
it through the :class:`WorkerWatch` they hold (:meth:`WorkerRegistry.watch`) within about a
second, whatever the reason it went (SIGKILL, OOM, host gone, network split). A worker about to
run a long final pass, which holds the GIL and so silences its heartbeats, announces a
``grace_s``; every beat repeats what is left of it, and the deadline is the later of
``timeout_s`` and ``grace_s`` after the last beat. A worker that stops cleanly says so in its
last beat (``leaving``): it is forgotten at once, without the warning a death gets.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import trio

from asrd import wire
from asrd.bus import Bus, heartbeat_subject
from asrd.errors import BusError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    beat: wire.Heartbeat
    last_seen: float
    dead: bool = False  # gone: declared dead, or it left
    left: bool = False  # it said goodbye (a clean stop), not silence
    # Events of the sessions decoded by this worker, set when it is declared dead.
    watchers: set[trio.Event] = field(default_factory=set)


HEARTBEAT_BACKLOG = 4096  # beats received but not yet read


class WorkerRegistry:
    def __init__(self, bus: Bus, prefix: str, timeout_s: float) -> None:
        self._bus = bus
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._workers: dict[str, _Entry] = {}
        # Workers that said goodbye, and when: a beat of theirs that comes after it (sent
        # just before) must not bring them back, to be declared dead later.
        self._left: dict[str, float] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        subject = heartbeat_subject(self._prefix)
        sub = await self._bus.subscribe(subject, max_pending=HEARTBEAT_BACKLOG)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reap_loop)
            task_status.started()
            while True:
                try:
                    msg = await sub.receive()
                except BusError as exc:
                    # Overflowed (a burst of beats while this loop was starved): beats are
                    # repeated every heartbeat_interval_s, so subscribe afresh and go on.
                    log.warning("heartbeats: %s; subscribing again", exc)
                    await self._bus.unsubscribe(sub)
                    sub = await self._bus.subscribe(subject, max_pending=HEARTBEAT_BACKLOG)
                    continue
                try:
                    beat = wire.decode_heartbeat(msg.data)
                except BusError as exc:
                    log.warning("ignoring malformed heartbeat: %s", exc)
                    continue
                if beat.leaving:
                    self._leave(beat.worker_id)
                    continue
                if beat.worker_id in self._left:
                    continue
                entry = self._workers.get(beat.worker_id)
                if entry is None:
                    log.info("engine worker %s (pool %s) is up", beat.worker_id, beat.pool)
                    self._workers[beat.worker_id] = _Entry(beat, trio.current_time())
                else:
                    entry.beat = beat
                    entry.last_seen = trio.current_time()

    async def _reap_loop(self) -> None:
        reconnects = self._bus.reconnects
        while True:
            await trio.sleep(self._timeout_s / 5)
            now = trio.current_time()
            if not self._bus.connected or self._bus.reconnects != reconnects:
                # Our own link was down: silence says nothing about the workers. Give them
                # a full timeout from now to be heard again.
                reconnects = self._bus.reconnects
                for entry in self._workers.values():
                    entry.last_seen = now
                continue
            for worker_id, entry in list(self._workers.items()):
                if entry.last_seen + max(self._timeout_s, entry.beat.grace_s) < now:
                    log.warning("engine worker %s missed its heartbeats: declared dead", worker_id)
                    self._forget(worker_id)
            for worker_id, left in list(self._left.items()):
                if left + self._timeout_s < now:
                    del self._left[worker_id]

    def _leave(self, worker_id: str) -> None:
        self._left[worker_id] = trio.current_time()
        if worker_id in self._workers:
            log.info("engine worker %s left", worker_id)
            self._forget(worker_id, left=True)  # its sessions, if any are left, move at once

    def _forget(self, worker_id: str, *, left: bool = False) -> None:
        entry = self._workers.pop(worker_id)
        entry.dead, entry.left = True, left
        for event in entry.watchers:
            event.set()
        entry.watchers.clear()

    def all(self) -> list[wire.Heartbeat]:
        return [e.beat for e in self._workers.values()]

    def alive(self, pool: str) -> list[wire.Heartbeat]:
        return [e.beat for e in self._workers.values() if e.beat.pool == pool]

    def paused_until(self, worker_id: str) -> float:
        """Until when ``worker_id`` announced it may be silent (a long final pass: it does
        nothing else meanwhile), by its last heartbeat; -inf for a worker not known."""
        entry = self._workers.get(worker_id)
        return entry.last_seen + entry.beat.grace_s if entry is not None else -math.inf

    def watch(self, worker_id: str, event: trio.Event) -> WorkerWatch:
        """Have ``event`` set when ``worker_id`` (known from a claim reply) is declared dead.

        A session waits on one event of its own for every reason to act (its worker died, or
        asked to hand it back) instead of a task per reason. Call :meth:`WorkerWatch.cancel`
        when the session stops watching: the registry outlives it."""
        entry = self._workers.get(worker_id)
        if entry is None:  # replied to a claim before we heard its first heartbeat
            entry = _Entry(wire.Heartbeat(worker_id, "", "", 0, 0), trio.current_time())
            self._workers[worker_id] = entry
        entry.watchers.add(event)
        return WorkerWatch(entry, event)


class WorkerWatch:
    """One session's watch on one worker (see :meth:`WorkerRegistry.watch`)."""

    __slots__ = ("_entry", "_event")

    def __init__(self, entry: _Entry, event: trio.Event) -> None:
        self._entry = entry
        self._event = event

    @property
    def dead(self) -> bool:
        return self._entry.dead

    @property
    def left(self) -> bool:
        """Gone after saying goodbye: a clean stop, not a failure."""
        return self._entry.left

    def cancel(self) -> None:
        self._entry.watchers.discard(self._event)
