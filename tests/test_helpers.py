"""The test helpers themselves (tests/servers.py): bounded waits, no leaked processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

import tests.servers
from tests.conftest import Nats
from tests.servers import alive, read_until, spawn, start_workers, stop

pytestmark = pytest.mark.integration
GUARD_S = 120

ROOT = Path(__file__).resolve().parents[1]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_read_until_fails_with_what_was_read_when_the_child_hangs_or_ends() -> None:
    """A child that goes quiet fails the wait at the timeout, not at CI's global one."""
    hung = subprocess.Popen(
        python("import sys, time; print('starting', file=sys.stderr, flush=True); time.sleep(60)"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert hung.stderr is not None
        began = time.monotonic()
        with pytest.raises(
            pytest.fail.Exception, match=r"no 'listening' \(not within 0.5 s\).*starting"
        ):
            read_until(hung.stderr, "listening", timeout=0.5)
        assert time.monotonic() - began < GUARD_S / 2
    finally:
        stop(hung)
    ended = subprocess.Popen(
        python("print('one'); print('two'); print('three')"), stdout=subprocess.PIPE, text=True
    )
    try:
        assert ended.stdout is not None
        assert read_until(ended.stdout, "two") == ["one\n", "two\n"]
        assert ended.stdout.read() == "three\n"  # what follows is left to the stream
    finally:
        stop(ended)
    ended = subprocess.Popen(python("print('one')"), stdout=subprocess.PIPE, text=True)
    try:
        assert ended.stdout is not None
        with pytest.raises(
            pytest.fail.Exception, match=r"no 'two' \(end of output before it\).*one"
        ):
            read_until(ended.stdout, "two")
    finally:
        stop(ended)


def test_workers_started_are_stopped_when_a_later_one_fails_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ``pool`` fixture's start: the first worker does not outlive the second's failure."""
    started: list[subprocess.Popen[bytes]] = []

    def start_worker(*args: object) -> subprocess.Popen[bytes]:
        if started:
            raise OSError("cannot start the second worker")
        started.append(spawn(python("import time; time.sleep(60)")))
        return started[0]

    monkeypatch.setattr(tests.servers, "start_worker", start_worker)
    with pytest.raises(OSError, match="second worker"), ExitStack() as stack:
        start_workers(stack, 2, "nats://127.0.0.1:1", "it-leak", 1)
    assert started[0].poll() is not None


ORPHANS = """
import os, signal, sys
from contextlib import ExitStack
from tests.servers import nats_server, redis_server, start_worker
stack = ExitStack()  # never closed: this process is SIGKILLed as a CI timeout would kill pytest
nats = stack.enter_context(nats_server())[0]
redis = stack.enter_context(redis_server())[0]
worker = start_worker(sys.argv[1], "it-orphan", 1, "--engine", "loadtest")
print(nats.pid, redis.pid, worker.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_servers_the_helpers_start_die_with_a_sigkilled_test_run(
    nats: Nats, tmp_path: Path
) -> None:
    """nats-server, redis-server and a worker started by ``tests.servers`` get SIGTERM when the
    process that started them is SIGKILLed, rather than run on forever on a shared machine."""
    run = subprocess.Popen(
        [*python(ORPHANS), nats.url],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # redis-server's dir, never removed
        stdout=subprocess.PIPE,  # the worker shares it: read the pids, not up to the end
        text=True,
    )
    try:
        assert run.stdout is not None
        pids = [int(pid) for pid in read_until(run.stdout, "")[0].split()]
        assert run.wait(GUARD_S) == -signal.SIGKILL
    finally:
        stop(run)
    try:
        deadline = time.monotonic() + GUARD_S
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids if alive(pid)]
    finally:
        for pid in pids:  # without PR_SET_PDEATHSIG: do not leak them from this test either
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_helpers_refuse_to_fork_in_a_thread_the_child_would_die_with() -> None:
    raised: list[BaseException] = []

    def start() -> None:
        try:
            stop(spawn(python("pass")))
        except RuntimeError as e:
            raised.append(e)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join(GUARD_S)
    assert raised and "main thread" in str(raised[0])
