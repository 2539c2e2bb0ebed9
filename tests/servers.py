"""Real servers for integration tests, on ephemeral loopback ports (never the machine's own)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from asrd.children import free_port, nats_server_binary


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


@contextmanager
def nats_server() -> Iterator[tuple[subprocess.Popen[bytes], str, int]]:
    port = free_port()
    proc = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "--no_advertise"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc)
        yield proc, f"nats://127.0.0.1:{port}", port
    finally:
        stop(proc)


def restart_nats(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "--no_advertise"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc)
    return proc


@contextmanager
def redis_server() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="asrd-redis-")
    proc = subprocess.Popen(
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
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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
    return subprocess.Popen(
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
