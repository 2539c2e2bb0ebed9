"""Real servers for integration tests, on ephemeral loopback ports (never the machine's own)."""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import IO

import pytest

from asrd.children import die_with_parent, free_port, nats_server_binary


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spawn(
    argv: Sequence[str], *, quiet: bool = False, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a server for a test; it gets SIGTERM when the test run dies, even by SIGKILL (a CI
    timeout), instead of running on as an orphan on the shared machine.

    ``PR_SET_PDEATHSIG`` fires when the forking *thread* exits, so fork only in the main thread:
    a child forked in a worker thread (``trio.to_thread``, whose idle threads exit after a few
    seconds) would die with that thread, mid-test."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"start {argv[0]!r} from the main thread: it dies with its thread")
    return subprocess.Popen(
        list(argv),
        preexec_fn=partial(die_with_parent, os.getpid()),
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.DEVNULL if quiet else None,
        env=env,
    )


def nats_argv(port: int) -> list[str]:
    return [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "--no_advertise"]


@contextmanager
def nats_server() -> Iterator[tuple[subprocess.Popen[bytes], str, int]]:
    port = free_port()
    proc = spawn(nats_argv(port), quiet=True)
    try:
        wait_port(port, proc)
        yield proc, f"nats://127.0.0.1:{port}", port
    finally:
        stop(proc)


def restart_nats(port: int) -> subprocess.Popen[bytes]:
    proc = spawn(nats_argv(port), quiet=True)
    try:
        wait_port(port, proc)
    except BaseException:
        stop(proc)
        raise
    return proc


@contextmanager
def redis_server() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="asrd-redis-")
    proc = spawn(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        quiet=True,
    )
    try:
        wait_port(port, proc)
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def start_worker(
    nats_url: str, pool: str, decoders: int, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A real `asrd worker` process (its log goes to our stderr, shown on failure)."""
    return spawn(
        [
            sys.executable,
            "-m",
            "asrd",
            "--log-level",
            "warning",
            "worker",
            "--nats-url",
            nats_url,
            "--pool",
            pool,
            "--decoders",
            str(decoders),
            "--processes",  # one process per Popen: tests kill and stop them one by one
            "1",
            *extra,
        ],
        env={**os.environ, **(env or {})},
    )


def start_workers(
    stack: ExitStack, count: int, nats_url: str, pool: str, decoders: int, *extra: str
) -> list[subprocess.Popen[bytes]]:
    """``count`` workers, each stopped when ``stack`` closes: registered as soon as it starts,
    so a later one failing to start does not leak the earlier ones."""
    workers = []
    for _ in range(count):
        worker = start_worker(nats_url, pool, decoders, *extra)
        stack.callback(stop, worker)
        workers.append(worker)
    return workers


def read_until(stream: IO[str] | IO[bytes], marker: str, timeout: float = 120.0) -> list[str]:
    """The lines of a child's pipe up to the first that holds ``marker`` (``""``: any line).

    Bounded, unlike ``readline()``: a child that hangs without printing fails the test after
    ``timeout`` with what it did print, instead of hanging the run until CI's global timeout.
    Reads the fd byte by byte, so nothing past that line is taken from the stream (nor buffered
    in it): read the rest through ``stream`` afterwards, as after a ``readline()``."""
    fd = stream.fileno()
    lines: list[str] = []
    line = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not lines or marker not in lines[-1]:
            left = deadline - time.monotonic()
            byte = os.read(fd, 1) if left > 0 and selector.select(left) else None
            if not byte:
                read = [*lines, line.decode(errors="replace")]
                why = f"not within {timeout} s" if byte is None else "end of output before it"
                pytest.fail(f"no {marker!r} ({why}); read: {read!r}")
            line += byte
            if byte == b"\n":
                lines.append(line.decode(errors="replace"))
                line = b""
    return lines
