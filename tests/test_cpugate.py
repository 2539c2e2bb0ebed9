"""asrd.cpugate: forked processes take turns for the cores, and a dead holder loses its slot."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from typing import Any

import pytest

from asrd.cpugate import WAIT_S, CpuGate, batch_policy

FORK = multiprocessing.get_context("fork")


def _hold(gate: CpuGate, index: int, out: Any) -> None:
    gate.bind(index)
    with gate:
        start = time.monotonic()
        time.sleep(0.2)
        out.put((start, time.monotonic(), gate.holding))


def _die_holding(gate: CpuGate, index: int) -> None:
    gate.bind(index)
    with gate:
        os.kill(os.getpid(), signal.SIGKILL)


def _run(target: Any, *args: Any) -> int:
    proc = FORK.Process(target=target, args=args)
    proc.start()
    proc.join()
    assert proc.exitcode is not None
    return proc.exitcode


@pytest.mark.parametrize("slots", [1, 2])
def test_no_more_processes_hold_the_gate_than_it_has_slots(slots: int) -> None:
    gate = CpuGate(slots, 4, wait_s=60)  # every process gets its turn
    out = FORK.Queue()
    procs = [FORK.Process(target=_hold, args=(gate, i, out)) for i in range(4)]
    for proc in procs:
        proc.start()
    spans = [out.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join()
    assert all(holding for _, _, holding in spans)
    # At each moment one of the holders began, at most `slots` held.
    for start, _, _ in spans:
        assert sum(s <= start < e for s, e, _ in spans) <= slots
    if slots == 1:
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def test_a_process_killed_holding_a_slot_gives_it_back_through_the_parent() -> None:
    gate = CpuGate(1, 2)
    assert _run(_die_holding, gate, 0) == -signal.SIGKILL
    gate.bind(1)
    with gate:  # the slot is lost: the wait ends, and the work goes on without one
        assert not gate.holding
    gate.reclaim(0)  # what asrd.prefork does once the process has exited
    with gate:
        assert gate.holding
    gate.reclaim(0)  # a process that held nothing gives nothing back
    with gate:
        assert gate.holding
    assert WAIT_S <= 1.0  # the event loop of a worker waits at most this long


def _wait_then_report(gate: CpuGate, index: int, out: Any) -> None:
    gate.bind(index)
    with gate:
        out.put(gate.holding)


def test_a_process_killed_while_waiting_adds_no_slot() -> None:
    """Killed while it waits for a slot, a process holds none: the parent must not give one
    back, or the gate would have one slot more for good."""
    gate = CpuGate(1, 3, wait_s=0.5)
    gate.bind(2)
    out = FORK.Queue()
    with gate:  # the only slot, held here
        waiter = FORK.Process(target=_wait_then_report, args=(gate, 0, out))
        waiter.start()
        deadline = time.monotonic() + 30
        while gate._held[0] != 1 and time.monotonic() < deadline:  # until it waits for the slot
            time.sleep(0.01)
        assert gate._held[0] == 1
        os.kill(waiter.pid or 0, signal.SIGKILL)
        waiter.join()
        gate.reclaim(0)
        assert _run(_wait_then_report, gate, 1, out) == 0
        assert out.get(timeout=5) is False  # still one slot, and it is ours
    assert _run(_wait_then_report, gate, 1, out) == 0
    assert out.get(timeout=5) is True


def test_a_gate_needs_a_slot_and_each_process_its_index() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CpuGate(0, 2)
    with pytest.raises(RuntimeError, match="bind"), CpuGate(1, 2):
        pass


def _refuse(pid: int, policy: int, param: object) -> None:
    """sched_setscheduler as a system-call filter (systemd's @resources) answers it."""
    raise PermissionError(1, "Operation not permitted")


def test_a_refused_batch_policy_is_logged_and_decoding_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "sched_setscheduler", _refuse)
    assert batch_policy() is False
    assert "SCHED_BATCH refused" in caplog.text
    monkeypatch.delattr(os, "SCHED_BATCH")
    assert batch_policy() is False  # a platform without it: nothing to say


def test_a_batch_policy_set_already_needs_no_call(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under the worker unit systemd sets it, and its system-call filter refuses the call."""
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_BATCH)
    monkeypatch.setattr(os, "sched_setscheduler", _refuse)
    assert batch_policy() is True
    assert "refused" not in caplog.text
