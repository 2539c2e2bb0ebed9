"""``asrd bench --spawn``: a private asrd stack whose processes the bench can measure.

The same processes ``asrd serve`` runs (a private nats-server, the engine workers, the
gateway), each started here with a generated configuration so that the bench knows every
PID: ``python -m asrd worker`` (which forks the worker processes) and ``python -m asrd
gateway`` against a nats-server on a free loopback port. The stack is ready once the gateway
listens and every worker has sent a heartbeat.

Children are started from the main thread with ``PR_SET_PDEATHSIG``, so they die with the
bench even if it is killed. (The parent-death signal follows the *thread* that forked: a
child forked from a short-lived helper thread, which is what ``trio.run_process`` uses, gets
it as soon as that thread exits.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from asrd.bench.procs import ProcSet
from asrd.children import die_with_parent, free_port, nats_server_binary

log = logging.getLogger(__name__)

__all__ = ["Stack", "StackConfig", "Target", "open_stack", "render_toml", "warn_capacity"]


@dataclass(frozen=True)
class StackConfig:
    engine: str = "loadtest"
    gateways: int = 1  # [server] processes: gateway processes sharing the port
    workers: int = 2
    decoders: int = 3
    # True: one `asrd worker --processes N` that loads the engine once and forks N processes
    # (what `asrd serve` and the default configuration run); False: N separate `asrd worker
    # --processes 1`, each loading its own copy of the model.
    shared_workers: bool = True
    final_pass: str = "adaptive"
    idle_timeout_s: float = 10.0
    max_sessions: int = 1000
    prefix: str = "asrd"
    nats_monitor_port: int = 0  # > 0: nats-server's HTTP monitoring on this port (diagnosis)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # more TOML sections/keys

    def sections(self, port: int) -> dict[str, dict[str, Any]]:
        sections: dict[str, dict[str, Any]] = {
            "server": {
                "host": "127.0.0.1",
                "port": port,
                "idle_timeout_s": self.idle_timeout_s,
                "max_sessions": self.max_sessions,
                "processes": self.gateways,
            },
            "nats": {"subject_prefix": self.prefix},
            "worker": {
                "engine": self.engine,
                "decoders": self.decoders,
                "final_pass": self.final_pass,
            },
        }
        for name, values in self.extra.items():
            sections.setdefault(name, {}).update(values)
        return sections


def render_toml(sections: dict[str, dict[str, Any]]) -> str:
    """A flat TOML document (scalars only) from ``{section: {key: value}}``."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")  # JSON scalars are valid TOML
        lines.append("")
    return "\n".join(lines)


@dataclass
class Stack:
    url: str
    port: int
    procs: ProcSet
    config: StackConfig


def _popen(argv: list[str], *, quiet: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        preexec_fn=partial(die_with_parent, os.getpid()),
        start_new_session=True,
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.DEVNULL if quiet else None,
    )


async def _stop(procs: list[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    with trio.move_on_after(timeout_s):
        while any(p.poll() is None for p in procs):  # noqa: ASYNC110 - Popen has no event
            await trio.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            log.warning("pid %d did not stop after SIGTERM: killing it", p.pid)
            p.kill()
            p.wait()


async def _wait_port(port: int, procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while True:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args!r} exited with status {p.returncode}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


def _listening_sockets(port: int) -> int:
    """How many sockets listen on ``port`` (one per gateway process, asrd.reuseport)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return count


async def _wait_listening(
    port: int, count: int, procs: list[subprocess.Popen[bytes]], timeout_s: float
) -> None:
    """Until ``count`` processes listen on ``port``: else the first takes every session."""
    with trio.fail_after(timeout_s):
        while _listening_sockets(port) < count:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args!r} exited with status {p.returncode}")
            await trio.sleep(0.05)


async def _wait_workers(
    nats_url: str, config: StackConfig, procs: list[subprocess.Popen[bytes]], timeout_s: float
) -> None:
    """Until every worker has sent a heartbeat (so every decoder can be claimed)."""
    from asrd import wire
    from asrd.bus import heartbeat_subject
    from asrd.bus.natsbus import open_nats_bus
    from asrd.config import NatsConfig

    seen: set[str] = set()
    async with open_nats_bus(NatsConfig(), nats_url, name="asrd-bench") as bus:
        sub = await bus.subscribe(heartbeat_subject(config.prefix), max_pending=4096)
        with trio.fail_after(timeout_s):
            while len(seen) < config.workers:
                with trio.move_on_after(0.5):
                    msg = await sub.receive()
                    seen.add(wire.decode_heartbeat(msg.data).worker_id)
                for p in procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"{p.args!r} exited with status {p.returncode}")
        await bus.unsubscribe(sub)


@asynccontextmanager
async def open_stack(
    config: StackConfig, *, log_level: str = "warning", startup_timeout_s: float = 300.0
) -> AsyncIterator[Stack]:
    """Run nats-server, ``config.workers`` workers and ``config.gateways`` gateway processes
    until the block ends."""
    port = free_port()
    nats_port = free_port()
    nats_url = f"nats://127.0.0.1:{nats_port}"
    asrd = [sys.executable, "-m", "asrd", "--log-level", log_level]
    started: list[subprocess.Popen[bytes]] = []  # nats-server first
    with tempfile.TemporaryDirectory(prefix="asrd-bench-") as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(render_toml(config.sections(port)))
        try:
            argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(nats_port)]
            argv.append("--no_advertise")
            if config.nats_monitor_port:
                argv += ["-m", str(config.nats_monitor_port)]
            nats = _popen(argv, quiet=True)
            started.append(nats)
            await _wait_port(nats_port, started, startup_timeout_s)
            workers = []
            worker_argv = [*asrd, "worker", "--config", str(path), "--nats-url", nats_url]
            for _ in range(1 if config.shared_workers else config.workers):
                processes = config.workers if config.shared_workers else 1
                w = _popen([*worker_argv, "--processes", str(processes)])
                workers.append(w)
                started.append(w)
            gateway = _popen([*asrd, "gateway", "--config", str(path), "--nats-url", nats_url])
            started.append(gateway)
            await _wait_listening(port, config.gateways, started, startup_timeout_s)
            await _wait_workers(nats_url, config, started, startup_timeout_s)
            await trio.sleep(0.5)  # the gateway hears the heartbeats too
            # The forked processes are their parent's children, listed again at each
            # reading: the parent forks one again when one dies (asrd.prefork).
            forked = config.shared_workers and config.workers > 1
            procs = ProcSet(
                {
                    "gateway": [gateway.pid],
                    "worker": [w.pid for w in workers],
                    "nats": [nats.pid],
                },
                parents={
                    "gateway": [gateway.pid] if config.gateways > 1 else [],
                    "worker": [workers[0].pid] if forked else [],
                },
            )
            log.info(
                "bench stack up: gateway pid %d, %d %s workers, nats pid %d",
                gateway.pid,
                config.workers,
                config.engine,
                nats.pid,
            )
            yield Stack(f"ws://127.0.0.1:{port}/ws/v1", port, procs, config)
        finally:
            with trio.CancelScope(shield=True):
                # Gateway first (its sessions end), then the workers, then NATS.
                await _stop(started[1:])
                await _stop(started[:1])


@dataclass
class Target:
    """What a bench runs against: a spawned stack, or a running asrd (``--url``)."""

    url: str
    procs: ProcSet
    stack: StackConfig | None
    capacity: int | None  # decoders available, when known


def warn_capacity(n: int, target: Target) -> None:
    if target.capacity is not None and n > target.capacity:
        print(
            f"asrd bench: warning: {n} sessions but only {target.capacity} decoders "
            f"({target.stack.workers if target.stack else '?'} workers): the rest get 40000005",
            file=sys.stderr,
        )
