"""The ``asrd`` command: serve, gateway, worker, transcribe, bench, keys, token, sign-url,
config, usage, transcript."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import trio

from asrd import control, gctune, logs, sdnotify
from asrd.children import die_at_once_with_parent
from asrd.config import Config, ConfigError, load_config
from asrd.cpugate import CpuGate, batch_policy
from asrd.errors import AsrdError, ShuttingDown
from asrd.reuseport import Reservation

log = logging.getLogger("asrd")

DEFAULT_CONFIG = "config.toml"
WORKER_DRAIN_S = 10.0  # a worker asked to stop finishes its sessions for at most this long
LEAVE_TIMEOUT_S = 2.0  # then says goodbye to the gateways (its last heartbeat), at most this long
# A daemon stopped by SIGHUP drains as for SIGTERM, then ends with the status of a process the
# signal killed: systemd's Restart=on-failure starts it again (re-reading config.toml). Ended
# with 0, the unit would stay down; killed outright, it would cut its sessions off.
HANGUP_STATUS = 128 + signal.SIGHUP
INTERRUPTED_STATUS = 128 + signal.SIGINT  # a Ctrl-C that stopped a command before it served


def _config_path(arg: str | None) -> str | None:
    if arg:
        return arg
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None


def _load(args: argparse.Namespace, **overrides: dict[str, Any]) -> Config:
    return load_config(_config_path(args.config), **overrides)


class _Stop:
    """Set by the first SIGTERM, SIGINT or SIGHUP, which it keeps: the command's status."""

    def __init__(self, event: trio.Event) -> None:
        self.event = event
        self.signum = 0  # none yet

    def status(self) -> int:
        return HANGUP_STATUS if self.signum == signal.SIGHUP else 0


async def _stop_on_signals(stop: _Stop, *, task_status: trio.TaskStatus[None]) -> None:
    """Set ``stop`` on the first SIGTERM, SIGINT or SIGHUP, then run until cancelled.

    A second SIGINT (Ctrl-C again) stops now: this task raises KeyboardInterrupt. (Left to
    trio's own delivery, it could land inside trio while a nursery closed, 1 run in 12 of
    tests/test_cli.py's second Ctrl-C: TrioInternalError and a traceback.) A second SIGTERM or
    SIGHUP changes nothing, as systemd expects (it sends SIGKILL after TimeoutStopSec):
    `systemctl kill` sends one to every process of the unit, and a forked process also gets
    the one its parent passes on; the second killed it in the middle of its drain.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if stop.signum:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt  # read as status 130 by _run_command
                log.info("received %s again: stopping already", name)
                continue
            stop.signum = signum
            log.info(
                "received %s: stopping%s",
                name,
                f", to end with status {HANGUP_STATUS}" if stop.status() else "",
            )
            sdnotify.stopping()
            die_at_once_with_parent()  # its SIGTERM would be a second one
            stop.event.set()


async def _ctrl_c_at_checkpoints(run: Callable[..., Awaitable[int]], *args: Any) -> int:
    """``run(*args)``, with a Ctrl-C raised by a task of ours at a checkpoint until
    :func:`_stop_on_signals` takes SIGINT over (and after it lets go).

    Left to trio's own delivery, a SIGINT while the gateway connected to NATS raised
    KeyboardInterrupt inside trio, in the middle of a task going to sleep: the asyncio
    thread's cleanup then failed with a TypeError, and the command ended with a traceback
    instead of status 130 (once in CI, under the whole suite; not in 90 runs of the test
    alone)."""

    async def ctrl_c(task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                raise KeyboardInterrupt  # read as status 130 by _run_command

    async with trio.open_nursery() as nursery:
        await nursery.start(ctrl_c)
        status = await run(*args)
        nursery.cancel_scope.cancel()
    return status


# --- serve / gateway ---------------------------------------------------------------------


async def _run_gateway(
    config: Config, config_path: str | None, nats_url: str | None, workers: int
) -> int:
    from asrd.children import start_child, start_nats_server, worker_argv

    # Nested: the workers stop (and leave NATS cleanly) before their nats-server does.
    async with trio.open_nursery() as nats_child:
        url = nats_url or config.nats.url
        if not url:
            _, url = await start_nats_server(nats_child)
        async with trio.open_nursery() as worker_child:
            if workers:  # one `asrd worker` loads the engine once and forks them all
                argv = worker_argv(config_path, url, ["--processes", str(workers)])
                # its drain, and the prefork supervisor's own teardown after it
                await start_child(
                    worker_child, argv, "asrd worker", stop_timeout_s=WORKER_DRAIN_S + 5
                )
            status = await _serve_gateway(config, url, workers)
            worker_child.cancel_scope.cancel()
        nats_child.cancel_scope.cancel()
    return status


async def _serve_gateway(
    config: Config, url: str, workers: int, reservation: Reservation | None = None
) -> int:
    """Serve until a stop signal and the drain, and return the status to end with. READY once
    NATS is reachable, ``workers`` workers are heard and the port is bound (Redis may still be
    down: that is logged)."""
    from asrd.bus.natsbus import open_nats_bus
    from asrd.gateway import Gateway
    from asrd.httpserve import serve_http
    from asrd.store import open_control_plane

    async with (
        open_nats_bus(config.nats, url, name="asrd-gateway") as bus,
        open_control_plane(config) as control,  # Redis when [redis] url is set
    ):
        gateway = Gateway(config, bus, control)
        stop = _Stop(gateway.stop_requested)
        where = ["starting"]  # then where it listens: systemctl status shows it with the count
        async with trio.open_nursery() as nursery:
            await nursery.start(_stop_on_signals, stop)
            # a full collection would pause every session: see gctune
            nursery.start_soon(gctune.periodically, gctune.empty_free_lists)
            nursery.start_soon(
                partial(
                    sdnotify.watchdog_loop,
                    lambda: bus.connected,
                    describe=lambda: _sessions_status(where[0], gateway.state.active),
                )
            )
            server = config.server
            if server.metrics_port:
                port = await nursery.start(
                    serve_http, server.metrics_host, server.metrics_port, gateway.health_routes()
                )
                log.info("gateway metrics on http://%s:%d/metrics", server.metrics_host, port)
            async with trio.open_nursery() as serving:
                interrupted = False
                try:
                    port = await serving.start(
                        partial(gateway.serve, wait_for_workers=workers, reservation=reservation)
                    )
                except* ShuttingDown:  # from the gateway's nursery: in a group
                    if stop.signum != signal.SIGINT:
                        raise
                    interrupted = True
                if interrupted:
                    # Ctrl-C while it waited for its workers: as one before its signal
                    # handler was set, an interrupted command, not a failure.
                    nursery.cancel_scope.cancel()
                    return INTERRUPTED_STATUS
                where[0] = f"listening on port {port}"
                sdnotify.ready(where[0])
            nursery.cancel_scope.cancel()
    return stop.status()


def _sessions_status(where: str, sessions: int) -> str:
    return f"{where}; {sessions} session{'' if sessions == 1 else 's'}"


def _worker_processes(config: Config) -> int:
    return config.worker.processes or os.cpu_count() or 1


def cmd_serve(args: argparse.Namespace) -> int:
    config = control.embedded_routing(
        _load(
            args,
            server={"host": args.host, "port": args.port},
            worker={"processes": args.workers},
        )
    )
    workers = _worker_processes(config)
    if config.server.processes > 1:
        log.warning(
            "asrd serve runs one gateway process; [server] processes = %d is for asrd gateway",
            config.server.processes,
        )
    gctune.tune()
    return trio.run(
        _ctrl_c_at_checkpoints, _run_gateway, config, _config_path(args.config), None, workers
    )


def cmd_gateway(args: argparse.Namespace) -> int:
    config = _load(
        args,
        server={"host": args.host, "port": args.port, "processes": args.processes},
        nats={"url": args.nats_url},
    )
    if not config.nats.url:
        raise ConfigError("asrd gateway needs a NATS server: set [nats] url or --nats-url")
    gctune.tune()
    server = config.server
    if server.processes == 1:
        return trio.run(_ctrl_c_at_checkpoints, _run_gateway, config, None, config.nats.url, 0)
    from asrd import reuseport
    from asrd.prefork import run_forked

    try:  # before forking, so that port 0 is one port for all
        reservation = reuseport.reserve(server.host, server.port)
    except OSError as exc:
        logs.fatal(f"cannot listen on {server.host}:{server.port}: {exc}")
        return 1
    serve = partial(_serve_gateway, url=config.nats.url, workers=0, reservation=reservation)
    with contextlib.closing(reservation):
        return run_forked(
            server.processes,
            partial(_process, "server", serve, config),
            what="gateway",
            stop_timeout_s=server.shutdown_grace_s + 15,  # the drain (Gateway.serve) and more
            on_stop=reservation.close,  # the port refuses connections once no process listens
        )


def _process(
    section: Literal["server", "worker"],
    run: Callable[[Config], Awaitable[int]],
    config: Config,
    index: int,
) -> int:
    """Process ``index`` of a command's forked processes (asrd.prefork) runs ``run(config)``;
    it serves metrics on ``[section] metrics_port + index``."""
    part = config.server if section == "server" else config.worker
    if index and part.metrics_port:
        port = part.metrics_port + index
        config = config.model_copy(update={section: part.model_copy(update={"metrics_port": port})})

    def process() -> int:  # a forked process ends here, not in main()
        return trio.run(_ctrl_c_at_checkpoints, run, config)

    return _run_command(process)


# --- worker ------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    from asrd.engines import create_engine

    config = _load(
        args,
        nats={"url": args.nats_url},
        worker={
            "decoders": args.decoders,
            "pool": args.pool,
            "engine": args.engine,
            "metrics_port": args.metrics_port,
            "processes": args.processes,
        },
    )
    if not config.nats.url:
        raise ConfigError("asrd worker needs a NATS server: set [nats] url or --nats-url")
    try:
        engine = create_engine(
            config.worker.engine,
            decoders=config.worker.decoders,
            final_pass=config.worker.final_pass,
            early_final=config.worker.early_final,
            **config.worker.engine_options,
        )
    except ValueError as exc:
        raise ConfigError(f"[worker] engine {config.worker.engine!r}: {exc}") from None
    gctune.tune()  # before forking: the frozen objects' pages stay shared
    processes = _worker_processes(config)
    slots = config.worker.decode_slots or os.cpu_count() or 1
    gate = CpuGate(slots, processes) if processes > slots else None
    run = partial(_process, "worker", partial(_run_worker, engine=engine, gate=gate), config)

    def work(index: int) -> int:
        if gate is not None:
            gate.bind(index)
        if config.worker.sched_batch:
            batch_policy()
        return run(index)

    if processes == 1:
        return work(0)
    from asrd.prefork import run_forked

    return run_forked(processes, work, on_exit=gate.reclaim if gate is not None else None)


async def _run_worker(config: Config, engine: Any, gate: CpuGate | None = None) -> int:
    from asrd.bus.natsbus import open_nats_bus
    from asrd.httpserve import serve_http
    from asrd.worker import Worker

    async with open_nats_bus(config.nats, config.nats.url, name="asrd-worker") as bus:
        worker = Worker(config.worker, config.nats.subject_prefix, bus, engine, gate)
        stop = _Stop(trio.Event())
        async with trio.open_nursery() as nursery:
            await nursery.start(_stop_on_signals, stop)
            await nursery.start(worker.run)
            nursery.start_soon(gctune.periodically, gctune.full_collection)
            nursery.start_soon(
                partial(
                    sdnotify.watchdog_loop,
                    lambda: bus.connected,
                    describe=lambda: f"{len(worker.sessions)} of {engine.capacity} decoders busy",
                )
            )
            if config.redis.url:  # the pool this worker serves may change live
                from asrd.store.follow import follow_worker_pool

                await nursery.start(follow_worker_pool, config, worker)
            if config.worker.metrics_port:
                port = await nursery.start(
                    serve_http,
                    config.worker.metrics_host,
                    config.worker.metrics_port,
                    worker.health_routes(),
                )
                log.info("worker metrics on http://%s:%d/metrics", config.worker.metrics_host, port)
            # Last: a process that cannot bind its metrics port fails at start, as a family.
            sdnotify.ready(f"worker {worker.id} serving pool {config.worker.pool}")
            await stop.event.wait()
            with trio.move_on_after(WORKER_DRAIN_S):
                await worker.drain()
            with trio.move_on_after(LEAVE_TIMEOUT_S):
                await worker.leave()
            nursery.cancel_scope.cancel()
    return stop.status()


# --- transcribe --------------------------------------------------------------------------


def cmd_transcribe(args: argparse.Namespace) -> int:
    from asrd.client import link_appkey
    from asrd.transcribe import run_transcribe

    # A signed link names its appkey, and the Start must name the same one (else 40020106).
    appkey = args.appkey or link_appkey(args.url) or os.environ.get("ASRD_APPKEY") or "default"
    return run_transcribe(
        args.file,
        url=args.url,
        token=args.token,
        appkey=appkey,
        realtime=args.realtime,
        json_lines=args.json,
        raw_rate=args.raw_rate,
    )


def _sample_rate(value: str) -> int:
    """``--raw-rate``: the rates a WAV may have (asrd.audio.MAX_FILE_RATE says why at most)."""
    from asrd.audio import MAX_FILE_RATE

    try:
        rate = int(value)
    except ValueError:
        rate = 0
    if not 0 < rate <= MAX_FILE_RATE:
        raise argparse.ArgumentTypeError(f"not a sample rate of 1 to {MAX_FILE_RATE} Hz: {value!r}")
    return rate


# --- main --------------------------------------------------------------------------------


# Modules that add their own sub-commands: each has ``add_commands(subparsers)`` whose parsers
# set ``func`` to a function taking the parsed arguments and returning the exit status.
COMMAND_MODULES: tuple[str, ...] = ("asrd.bench", "asrd.store.cli")
LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asrd", description=__doc__)
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=os.environ.get("ASRD_LOG_LEVEL", "info").lower(),
        help="before the command; default $ASRD_LOG_LEVEL or info",
    )
    p.add_argument(
        "--log-json",
        action="store_true",
        default=os.environ.get("ASRD_LOG_JSON") == "1",
        help="JSON lines with session_id/task_id on every session line",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="all-in-one: private nats-server, engine workers, gateway")
    s.add_argument("--config", help="TOML file (default: ./config.toml if present)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int, help="engine worker processes (default: one per core)")
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("gateway", help="the WebSocket gateway alone, against an external NATS")
    g.add_argument("--config")
    g.add_argument("--host")
    g.add_argument("--port", type=int)
    g.add_argument("--nats-url")
    g.add_argument(
        "--processes",
        type=int,
        help="gateway processes sharing the port, one event loop each (default: 1)",
    )
    g.set_defaults(func=cmd_gateway)

    w = sub.add_parser("worker", help="engine worker processes, against an external NATS")
    w.add_argument("--config")
    w.add_argument("--nats-url")
    w.add_argument(
        "--processes",
        type=int,
        help="processes forked after the engine is loaded, sharing it (default: one per core)",
    )
    w.add_argument("--decoders", type=int, help="decoders preloaded by this worker")
    w.add_argument("--pool", help="the pool (language) served, e.g. en-US")
    w.add_argument("--engine", help="engine name (pocketsphinx, loadtest)")
    w.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz here")
    w.set_defaults(func=cmd_worker)

    t = sub.add_parser("transcribe", help="stream a WAV file to asrd and print the sentences")
    t.add_argument("file", help="a WAV file, or - to read stdin")
    t.add_argument(
        "--raw-rate",
        type=_sample_rate,
        metavar="HZ",
        help="the input is raw 16-bit little-endian mono PCM at HZ, no WAV",
    )
    t.add_argument("--url", default="ws://127.0.0.1:8080/ws/v1", help="default: %(default)s")
    # Not %(default)s for the token: --help would print it.
    t.add_argument("--token", default=os.environ.get("ASRD_TOKEN"), help="default: $ASRD_TOKEN")
    t.add_argument(
        "--appkey",
        help="default: the appkey= of a signed link in --url, else $ASRD_APPKEY, else 'default'",
    )
    speed = t.add_mutually_exclusive_group()
    speed.add_argument(
        "--realtime",
        dest="realtime",
        action="store_true",
        default=True,
        help="send audio at real time (default)",
    )
    speed.add_argument(
        "--fast",
        dest="realtime",
        action="store_false",
        help="send audio as fast as the server takes it",
    )
    t.add_argument("--json", action="store_true", help="print every event as a JSON line")
    t.set_defaults(func=cmd_transcribe)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # SIGINT stops asrd however it was started (the first drains, a second stops at once). A
    # shell starts a background job with SIGINT ignored: one while it started did nothing,
    # the first later was caught (a signal receiver of its own) but not the second. (Only a
    # process's main thread may; tests run some commands in threads.)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        parser = build_parser()  # imports every command's module (numpy among them): a moment
    except KeyboardInterrupt:  # a Ctrl-C meanwhile: the status of one later, no traceback
        return 130
    args = parser.parse_args(argv)
    if args.log_level not in LOG_LEVELS:  # from $ASRD_LOG_LEVEL, which argparse does not check
        parser.error(f"ASRD_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
    logs.setup(args.log_level, json_lines=args.log_json)
    return _run_command(lambda: int(args.func(args)))


def _run_command(run: Callable[[], int]) -> int:
    """``run()``'s status, with its errors as a reason on stderr and a status: a command in
    ``main``, or one forked process of a command."""
    try:
        return run()
    except ConfigError as exc:
        logs.fatal(str(exc))
        return 2
    except AsrdError as exc:  # e.g. NATS unreachable or refusing our credentials at start
        logs.fatal(exc.reason)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _output_closed()
    except BaseExceptionGroup as group:  # from the nurseries of serve, gateway, transcribe
        return _exit_status(group)


def _exit_status(group: BaseExceptionGroup[BaseException]) -> int:
    """What ``main`` does for one error, for a group of them; anything else is a bug and goes
    on as a traceback."""
    interrupted, _ = group.split(KeyboardInterrupt)  # a second Ctrl-C, or one while starting
    if interrupted is not None:
        return 130
    _, rest = group.split(BrokenPipeError)
    if rest is None:
        return _output_closed()
    _, unknown = rest.split((ConfigError, AsrdError))
    if unknown is not None:
        raise group
    status = 1
    for exc in _leaves(rest):
        if isinstance(exc, ConfigError):
            logs.fatal(str(exc))
            status = 2
        elif isinstance(exc, AsrdError):
            logs.fatal(exc.reason)
    return status


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _output_closed() -> int:
    """Whoever read our output went away (``asrd transcribe --json | head``): end quietly with
    the status of a process killed by SIGPIPE, as a C tool in the same pipe would, and keep
    Python's exit from failing again on flushing stdout."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE
