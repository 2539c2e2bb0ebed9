"""How one ``asrd worker``'s forks share the cores: one decodes per core at a time, and none
preempts another's decode.

Fourteen one-decoder processes on two cores that all decode at once are time-sliced by the
kernel in the middle of their chunks, and each slice evicts the others' search state from the
caches. Measured with the engine alone (``bench/engine_realtime.py --gate``, docs/benchmarks.md),
nine real-time streams cost 10-28% less CPU per stream-second when only two decode at once;
the others wait a few milliseconds for a slot instead of thrashing.

Worker processes also run under the kernel's ``SCHED_BATCH`` policy (:func:`batch_policy`,
``[worker] sched_batch``): a worker woken by a message or a timer then waits for the running
decoder's time slice to end instead of preempting it in the middle of its step. The gateway and
nats-server keep their normal wake-up preemption over the workers. Alternated at 10 streams on
the Intel machine (docs/benchmarks.md, "Workers under SCHED_BATCH"), the workers took 2-9% less
CPU and the partial lag p95 a third to a quarter of the lag without it, in 4 alternated pairs
of 4; on the AMD machine each policy won 2 of 4, within the spread of the hour's minutes.

A process killed while it holds a slot (the watchdog's SIGABRT, the OOM killer) would keep it
forever, so each process marks in shared memory whether it waits for a slot or holds one, and
the parent hands back the slot of a process that died holding it (:meth:`CpuGate.reclaim`,
from asrd.prefork). One killed while it waits holds none and gets none back: the semaphore
cannot tell a slot given back twice, and would have one more for good. A wait longer than
:data:`WAIT_S` decodes without a slot rather than stalls.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from types import TracebackType

__all__ = ["WAIT_S", "CpuGate", "batch_policy"]

log = logging.getLogger(__name__)

WAIT_S = 0.5  # the longest a decode waits for a slot (it blocks the worker's event loop)
# What a process's mark says; only HOLDING makes the parent give a slot back.
_IDLE, _BUSY, _HOLDING = 0, 1, 2  # _BUSY: waiting for a slot, or giving one back


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
        self._held = ctx.RawArray("b", processes)  # process i: _IDLE, _BUSY or _HOLDING
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
        # Killed between the acquire and the mark, a process would lose its slot for good:
        # a window of two bytecodes, against the whole wait if the wait were marked holding.
        self._held[self._index] = _BUSY
        self._holding = self._sem.acquire(timeout=self.wait_s)
        self._held[self._index] = _HOLDING if self._holding else _IDLE

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._holding:
            self._holding = False
            self._held[self._index] = _BUSY
            self._sem.release()
            self._held[self._index] = _IDLE

    def reclaim(self, index: int) -> None:
        """In the parent, once child ``index`` has exited: release the slot it held, if any."""
        mark, self._held[index] = self._held[index], _IDLE
        if mark == _HOLDING:
            self._sem.release()


def batch_policy() -> bool:
    """Put this process (and the threads it starts from now on) under ``SCHED_BATCH``, so that
    its wake-ups do not preempt another process's decode. Needs no privilege; False where the
    platform has no such policy or refuses it."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return False
    if os.sched_getscheduler(0) == policy:  # set by systemd (the worker unit), whose
        return True  # system-call filter refuses the call itself
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:
        log.warning("SCHED_BATCH refused, decoding under the default policy: %s", exc)
        return False
    return True
