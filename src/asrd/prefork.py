"""Worker processes forked from one that has loaded the engine, so that they share its model.

A pocketsphinx decoder is about 91 MB of model tables that decoding only reads. A process
that loads the engine and then forks N children gives them those pages copy-on-write, so the
model sits in RAM once instead of N times: 14 pocketsphinx worker processes take 537 MB
(the sum of their PSS) instead of 1,873 MB, and start in the time one takes to load
(docs/benchmarks.md, "Worker processes that share the model").

``asrd gateway`` with ``[server] processes`` above 1 forks its gateway processes the same way;
they share a port (asrd.reuseport) rather than a model.

The parent only supervises; it never starts a thread or an event loop, so forking is safe:

* it passes each SIGTERM, SIGINT and SIGHUP it gets on to every child (each in a process group
  of its own, so that a terminal's Ctrl-C reaches it once, through the parent) and exits when
  all have stopped: the first starts their drain, a second SIGINT (Ctrl-C again) ends it at
  once, as it does for one process, and it ends with 129 after a SIGHUP, as one process does;
* it stands between systemd and the children: they report to the parent's own notification
  socket (the protocol of :mod:`asrd.sdnotify`); the parent sends READY=1 once every child
  has, STOPPING=1 on a signal, and the watchdog while it runs, and kills a child that stops
  pinging it for a watchdog period;
* a child that exits before it was ready fails the whole command with the child's status
  (a wrong NATS URL fails ``asrd worker`` as it does without forking); one that exits later
  is forked again from the parent's untouched copy of the engine, after a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from asrd import sdnotify
from asrd.children import die_with_parent

__all__ = ["RESTART_DELAY_S", "STOP_TIMEOUT_S", "run_forked"]

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0  # before a child that died after it was ready is forked again
# A child that dies again within STABLE_S of its fork waits twice as long, up to this: a fault
# that kills it at once (a port taken, a broken disk) is not re-forked every second for good.
MAX_RESTART_DELAY_S = 60.0
STABLE_S = 60.0
STOP_TIMEOUT_S = 30.0  # by default, children still running this long after SIGTERM are killed
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_UCRED = struct.Struct("3i")  # pid, uid, gid of SCM_CREDENTIALS


@dataclass
class _Child:
    index: int
    ready: bool = False
    pinged: float = 0.0  # time.monotonic() of its last WATCHDOG=1 (or of its start)
    started: float = 0.0  # time.monotonic() of its fork
    aborted: float | None = None  # time.monotonic() of the watchdog's SIGABRT


def _status(wait_status: int) -> int:
    """A child's exit status as a shell shows it (128 + N when killed by signal N)."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _in_child(
    index: int,
    target: Callable[[int], int],
    notify_address: str,
    watchdog_usec: str | None,
    fds: list[int],
    parent: int,
) -> None:
    """Runs after fork in the child, with the stop signals blocked, and never returns."""
    code = 1
    try:
        for fd in fds:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # one sent meanwhile: now
        # A process group of its own: a terminal's Ctrl-C reaches only the parent, which passes
        # it on once. A child that got it twice (from the terminal, then from the parent) would
        # take the second as "stop now" and cut its drain short.
        os.setpgid(0, 0)
        die_with_parent(parent)  # even when the parent is SIGKILLed
        for key in sdnotify.ENVIRONMENT_KEYS:
            os.environ.pop(key, None)
        os.environ["NOTIFY_SOCKET"] = notify_address
        if watchdog_usec is not None:  # the child pings us; we ping systemd for all
            os.environ["WATCHDOG_USEC"] = watchdog_usec
        code = target(index)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # a child must never return into the parent's code
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def run_forked(
    count: int,
    target: Callable[[int], int],
    *,
    what: str = "worker",
    stop_timeout_s: float = STOP_TIMEOUT_S,
    on_stop: Callable[[], None] | None = None,
    on_exit: Callable[[int], None] | None = None,
) -> int:
    """Run ``target(index)`` in ``count`` forked children until a signal stops them.

    ``target`` returns the child's exit status. Returns the command's exit status: 0 after a
    signal, or the status of a child that failed before every child was ready. ``on_stop``
    runs once when stopping begins (no child is forked after it); children still running
    ``stop_timeout_s`` later are killed. ``on_exit(index)`` runs after each child has exited
    (asrd.cpugate hands back what it held).
    """
    return _Supervisor(count, target, what, stop_timeout_s, on_stop, on_exit).run()


class _Supervisor:
    def __init__(
        self,
        count: int,
        target: Callable[[int], int],
        what: str,
        stop_timeout_s: float,
        on_stop: Callable[[], None] | None,
        on_exit: Callable[[int], None] | None,
    ) -> None:
        self.count = count
        self.on_exit = on_exit
        self.target = target
        self.what = what
        self.stop_timeout_s = stop_timeout_s
        self.on_stop = on_stop
        self.children: dict[int, _Child] = {}
        self.restarts: list[tuple[float, int]] = []  # (when, index) of children to fork again
        self.delays: dict[int, float] = {}  # index -> the wait before its next fork
        self.announced = False  # READY=1 sent
        self.stopping = False
        self.stop_deadline = 0.0
        self.failure = 0
        self.interrupted = False  # a second SIGINT: we end with 130, as one process does
        self.hung_up = False  # stopped by SIGHUP: we end with 129, as one process does (cli)
        self.watchdog = sdnotify.watchdog_interval()
        self.child_watchdog = os.environ["WATCHDOG_USEC"] if self.watchdog is not None else None
        self.own_fds: list[int] = []  # closed in children
        self.name = f"\0asrd-prefork-{os.getpid()}-{secrets.token_hex(4)}"

    def run(self) -> int:
        notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notifications.bind(self.name)
        notifications.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notifications.setblocking(False)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The pipe first: a signal caught by our handler before it was in place would be lost
        # (the handler does nothing; only the byte in the pipe tells the loop).
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        previous = {signum: signal.signal(signum, lambda *_: None) for signum in _SIGNALS}
        self.own_fds = [notifications.fileno(), wake_r, wake_w]
        try:
            for index in range(self.count):
                self._fork(index)
            next_ping = time.monotonic()
            while self.children or self.restarts:
                now = time.monotonic()
                timeouts = [1.0]
                if self.watchdog is not None:
                    if now >= next_ping:
                        self._ping(now)
                        next_ping = now + self.watchdog
                    timeouts.append(next_ping - now)
                if self.restarts:
                    timeouts.append(self.restarts[0][0] - now)
                readable, _, _ = select.select(
                    [notifications.fileno(), wake_r], [], [], max(0.0, min(timeouts))
                )
                if wake_r in readable:
                    for signum in os.read(wake_r, 512):
                        if signum in _STOP_SIGNALS:
                            self._on_signal(signal.Signals(signum))
                if notifications.fileno() in readable:
                    _read_notification(notifications, self.children)
                    if not self.announced and not self.stopping:
                        if all(c.ready for c in self.children.values()):
                            self.announced = True
                            sdnotify.ready(f"{len(self.children)} {self.what} processes")
                self._reap()
                while self.restarts and self.restarts[0][0] <= time.monotonic():
                    index = self.restarts.pop(0)[1]
                    try:
                        self._fork(index)
                    except OSError as exc:  # EAGAIN, ENOMEM: the others serve on meanwhile
                        delay = self._restart_later(index, soon=True)
                        log.error(
                            "%s process %d could not be forked again (%s): trying again in %g s",
                            self.what,
                            index,
                            exc,
                            delay,
                        )
                if self.stopping and time.monotonic() > self.stop_deadline:
                    for pid in self.children:
                        log.warning("%s pid %d did not stop: killing it", self.what, pid)
                        self._signal(pid, signal.SIGKILL)
                    self.stop_deadline = float("inf")
            return self.failure or (130 if self.interrupted else 129 if self.hung_up else 0)
        finally:
            for pid in self.children:  # only left after an exception of our own
                self._signal(pid, signal.SIGKILL)
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(wake_r)
            os.close(wake_w)
            notifications.close()

    def _fork(self, index: int) -> None:
        # Blocked across the fork: a SIGTERM passed on to the child before it has reset our
        # handlers would run ours there, and be lost. The child unblocks it once its own
        # handlers are in place; the parent at once.
        parent = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _in_child(
                    index,
                    self.target,
                    "@" + self.name[1:],
                    self.child_watchdog,
                    self.own_fds,
                    parent,
                )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        now = time.monotonic()
        self.children[pid] = _Child(index, pinged=now, started=now)
        log.info("%s process %d started (pid %d)", self.what, index, pid)

    def _ping(self, now: float) -> None:
        """Ping systemd's watchdog for the family, and do its job for each child.

        A child pings us while its event loop runs and NATS is connected. One silent for a
        whole watchdog period is killed (SIGABRT, as systemd would) and forked again, so one
        wedged process does not take its siblings down with a restart of the whole unit. One
        still there a period after its SIGABRT gets SIGKILL, as systemd would after
        TimeoutAbortSec: one that handles SIGABRT does not end, and its slot would stay dead
        for good. SIGCONT follows the SIGABRT, as systemd sends it: a stopped process (SIGSTOP)
        acts on the SIGABRT then, and waited for the SIGKILL, dead a period longer.
        """
        assert self.watchdog is not None
        sdnotify.notify("WATCHDOG=1")
        period = 2 * self.watchdog
        for pid, child in self.children.items():
            if self.stopping:  # the stop deadline kills what is left
                break
            if child.aborted is None and now - child.pinged >= period:
                log.warning("%s pid %d stopped pinging the watchdog: killing it", self.what, pid)
                child.aborted = now
                self._signal(pid, signal.SIGABRT)
                self._signal(pid, signal.SIGCONT)  # a stopped one acts on it then, as systemd's
            elif child.aborted is not None and now - child.aborted >= period:
                log.warning("%s pid %d did not end on SIGABRT: killing it", self.what, pid)
                child.aborted = float("inf")  # once
                self._signal(pid, signal.SIGKILL)

    def _on_signal(self, signum: signal.Signals) -> None:
        if not self.stopping:
            self._stop(f"received {signum.name}: stopping", signum)
            return
        # Stopping already: passed on, the children take it as one process does (asrd.cli): a
        # second SIGINT (Ctrl-C again) as "now", a second SIGTERM or SIGHUP as nothing new.
        # Kept from them, a second Ctrl-C left a draining child running for its whole drain.
        log.info("received %s again: passing it on", signum.name)
        self.interrupted = self.interrupted or signum == signal.SIGINT
        for pid in self.children:
            self._signal(pid, signum)

    def _stop(self, why: str, signum: int = signal.SIGTERM) -> None:
        if self.stopping:
            return
        log.info("%s", why)
        self.stopping = True
        self.hung_up = signum == signal.SIGHUP
        self.stop_deadline = time.monotonic() + self.stop_timeout_s
        self.restarts.clear()
        if self.on_stop is not None:
            self.on_stop()
        sdnotify.stopping()
        for pid in self.children:
            self._signal(pid, signum)  # a Ctrl-C as SIGINT: a second then reads as the second

    def _reap(self) -> None:
        while self.children:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None and self.on_exit is not None:
                self.on_exit(child.index)
            if child is None or self.stopping:
                continue
            code = _status(wait_status)
            if not self.announced:
                log.error("%s process %d exited with %d at start", self.what, child.index, code)
                self.failure = code or 1
                self._stop("stopping the other processes")
            else:
                soon = time.monotonic() - child.started < STABLE_S  # after its last fork
                delay = self._restart_later(child.index, soon=soon)
                log.warning(
                    "%s process %d (pid %d) exited with %d: starting it again in %g s",
                    self.what,
                    child.index,
                    pid,
                    code,
                    delay,
                )

    def _restart_later(self, index: int, *, soon: bool) -> float:
        """Schedule another fork of ``index`` and return its delay: RESTART_DELAY_S, doubled
        up to MAX_RESTART_DELAY_S while it keeps failing ``soon`` (a fault that strikes at
        once is not retried every second for good)."""
        delay = RESTART_DELAY_S
        if soon:
            delay = min(2 * self.delays.get(index, RESTART_DELAY_S / 2), MAX_RESTART_DELAY_S)
        self.delays[index] = delay
        self.restarts.append((time.monotonic() + delay, index))
        self.restarts.sort()
        return delay

    @staticmethod
    def _signal(pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _read_notification(sock: socket.socket, children: dict[int, _Child]) -> None:
    """Note the sender's READY=1 and WATCHDOG=1."""
    try:
        data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
    except BlockingIOError:
        return
    sender = 0
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            sender = _UCRED.unpack(payload[: _UCRED.size])[0]
    child = children.get(sender)
    if child is None:
        return
    lines = data.split(b"\n")
    if b"READY=1" in lines:
        child.ready = True
    if b"WATCHDOG=1" in lines:
        child.pinged = time.monotonic()
