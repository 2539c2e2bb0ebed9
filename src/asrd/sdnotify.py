"""A tiny, dependency-free client of systemd's notification protocol (``sd_notify(3)``).

Under a ``Type=notify`` unit systemd puts the path of a datagram socket in ``$NOTIFY_SOCKET``
(``@name`` means a Linux abstract socket) and, with ``WatchdogSec=``, the watchdog period in
``$WATCHDOG_USEC`` (and the pid it is meant for in ``$WATCHDOG_PID``). A service reports
``READY=1`` when it serves, ``STOPPING=1`` when it begins to stop, a free-form ``STATUS=``
shown by ``systemctl status``, and ``WATCHDOG=1`` at least once per watchdog period.

Everything here is a no-op (returning ``False``) when ``$NOTIFY_SOCKET`` is unset, so the same
code runs under systemd, in a terminal and in tests. Sending never raises: a lost notification
must not take the service down.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

import trio

__all__ = [
    "ENVIRONMENT_KEYS",
    "child_environ",
    "extend_timeout",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog_interval",
    "watchdog_loop",
]

log = logging.getLogger(__name__)

# Variables systemd sets for the main process only; children must not inherit them.
ENVIRONMENT_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
SEND_TIMEOUT_S = 1.0  # systemd reads its socket promptly; never block the event loop longer


def _address(environ: Mapping[str, str]) -> str | None:
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace
    if path.startswith("/"):
        return path
    return None  # unset, or a kind we do not speak (vsock:)


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` lines) to systemd.

    Returns True when the datagram was sent, False when there is no notification socket or
    sending failed (logged once per failure at warning level).
    """
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify %r failed: %s", state.split("\n", 1)[0], exc)
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())  # a STATUS= value must not contain a newline


def ready(status_text: str | None = None) -> bool:
    """The service is up: ``READY=1`` (with a status line)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else ""))


def stopping(status_text: str | None = None) -> bool:
    """The service begins to stop (drain): ``STOPPING=1``."""
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else ""))


def status(text: str) -> bool:
    """A one-line status for ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def reloading() -> bool:
    """The service begins to reload its configuration; send :func:`ready` when done.

    ``MONOTONIC_USEC`` lets ``Type=notify-reload`` units (systemd >= 253) match the reload.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before systemd's start/stop timeout fires."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to send ``WATCHDOG=1`` (half the period), or None when no watchdog is on.

    The watchdog is on when ``$WATCHDOG_USEC`` is a positive integer and ``$WATCHDOG_PID``, if
    set, is our pid (a child that inherited the variables must stay quiet).
    """
    env = os.environ if environ is None else environ
    if _address(env) is None:
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid.strip() != str(os.getpid())):
        return None
    return usec / 2_000_000


async def watchdog_loop(
    healthy: Callable[[], bool],
    *,
    describe: Callable[[], str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Send ``WATCHDOG=1`` every half watchdog period while ``healthy()``; run until cancelled.

    While ``healthy()`` is false nothing is pinged, so systemd restarts a service that stays
    unhealthy (NATS unreachable, say) for a whole ``WatchdogSec``; a wedged event loop cannot
    ping either. ``describe``, when given, is sent as ``STATUS=`` whenever its text changes.
    Returns at once when systemd runs no watchdog for us.
    """
    interval = watchdog_interval(environ)
    if interval is None:
        return
    env = os.environ if environ is None else environ
    shown = ""
    while True:
        lines = []
        if healthy():
            lines.append("WATCHDOG=1")
        if describe is not None:
            text = _one_line(describe())
            if text != shown:
                shown = text
                lines.append(f"STATUS={text}")
        if lines:
            notify("\n".join(lines), environ=env)
        await trio.sleep(interval)


def child_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment without systemd's notification variables, for children.

    A child process that inherited ``$NOTIFY_SOCKET`` would report READY/STOPPING of its own
    (ignored under ``NotifyAccess=main``, but logged by systemd as an error).
    """
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k not in ENVIRONMENT_KEYS}
