"""At most one decoding worker process per core at a time, across one ``asrd worker``'s forks.

Fourteen one-decoder processes on two cores that all decode at once are time-sliced by the
kernel in the middle of their chunks, and each slice evicts the others' search state from the
caches. Measured with the engine alone (``bench/engine_realtime.py --gate``, docs/benchmarks.md),
nine real-time streams cost 10-28% less CPU per stream-second when only two decode at once;
the others wait a few milliseconds for a slot instead of thrashing.

A process killed while it holds a slot (the watchdog's SIGABRT, the OOM killer) would keep it
forever, so each process marks the slot it holds in shared memory, and the parent hands back
the slot of a process that died (:meth:`CpuGate.reclaim`, from asrd.prefork). A wait longer
than :data:`WAIT_S` decodes without a slot rather than stalls.
"""

from __future__ import annotations

import multiprocessing
from types import TracebackType

__all__ = ["WAIT_S", "CpuGate"]

WAIT_S = 0.5  # the longest a decode waits for a slot (it blocks the worker's event loop)


class CpuGate:
    """A cross-process semaphore of ``slots``, created before forking ``processes`` children.

    Each child calls :meth:`bind` with its index first; then ``with gate:`` around engine work.
    """

    def __init__(self, slots: int, processes: int, wait_s: float = WAIT_S) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        ctx = multiprocessing.get_context("fork")
        self.wait_s = wait_s
        self._sem = ctx.Semaphore(slots)
        self._held = ctx.RawArray("b", processes)  # 1: process i holds (or waits for) a slot
        self._index = -1
        self._holding = False

    def bind(self, index: int) -> None:
        self._index = index

    @property
    def holding(self) -> bool:
        """Whether this process holds a slot (inside ``with gate:``, unless the wait ran out)."""
        return self._holding

    def __enter__(self) -> None:
        if self._index < 0:
            raise RuntimeError("CpuGate.bind(index) must be called in each process first")
        # Marked before the wait: a process that dies in between makes the parent release a
        # slot it never took (one slot too many for a while), never lose one.
        self._held[self._index] = 1
        self._holding = self._sem.acquire(timeout=self.wait_s)
        if not self._holding:
            self._held[self._index] = 0

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._holding:
            self._holding = False
            self._sem.release()
            self._held[self._index] = 0

    def reclaim(self, index: int) -> None:
        """In the parent, once child ``index`` has exited: release the slot it held, if any."""
        if self._held[index]:
            self._held[index] = 0
            self._sem.release()
