"""The ``asrd bench`` command: its options, the stack it runs against, load runs and the capacity
search; idle-session memory is in asrd.bench.idle, the engine baseline in asrd.bench.baseline,
the report in asrd.bench.report."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import trio

from asrd.bench.baseline import Baseline, run_baseline
from asrd.bench.corpus import Corpus, default_data_dir, load_corpus
from asrd.bench.idle import idle_memory
from asrd.bench.load import LoadPlan, SessionResult, run_load, schedule, split
from asrd.bench.procs import ProcSet, Sampler, machine_busy_s, parse_pids
from asrd.bench.report import (
    HoldCriteria,
    build_report,
    format_reports,
    machine_info,
    markdown_tables,
    report_text,
    rss_growth,
)
from asrd.bench.stack import StackConfig, Target, open_stack, warn_capacity
from asrd.config import MAX_DECODERS, FinalPass

log = logging.getLogger(__name__)

__all__ = ["add_commands", "cmd_bench"]

MAX_CAPACITY_STEPS = 16


def add_commands(subparsers: Any) -> None:
    b = subparsers.add_parser(
        "bench",
        help="load generator and benchmarks (latency, capacity, CPU, memory)",
        description=(
            "Stream real recordings over N concurrent sessions against a running asrd "
            "(--url) or a private stack (--spawn), and report partial lag, endpointing "
            "latency, WER, CPU and RSS. See docs/benchmarks.md."
        ),
    )
    target = b.add_argument_group("target")
    target.add_argument("--url", help="ws://HOST:PORT/ws/v1 of a running asrd")
    target.add_argument(
        "--pids",
        default="",
        help="processes to measure with --url: ROLE=PID,... (roles: gateway, worker, nats)",
    )
    target.add_argument(
        "--spawn", action="store_true", help="run a private `asrd serve` stack and measure it"
    )
    target.add_argument(
        "--engine",
        default="loadtest",
        help="--spawn: engine of the workers (loadtest or pocketsphinx; default loadtest)",
    )
    target.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="--spawn: gateway processes sharing the port ([server] processes; default 1)",
    )
    target.add_argument("--workers", type=int, default=2, help="--spawn: worker processes")
    target.add_argument("--decoders", type=int, default=3, help="--spawn: decoders per worker")
    target.add_argument(
        "--separate-workers",
        action="store_true",
        help="--spawn: start each worker as its own `asrd worker --processes 1`, loading its own "
        "model, instead of one `asrd worker` forking them all (the default, as asrd serve does)",
    )
    target.add_argument(
        "--final-pass",
        choices=get_args(FinalPass),
        default="adaptive",
        help="--spawn and --engine-baseline: [worker] final_pass (default adaptive)",
    )
    target.add_argument(
        "--no-early-final",
        action="store_true",
        help="--spawn: [worker] early_final = false, the batch final pass runs when a sentence "
        "closes rather than once a pause reaches --pause-hint-ms",
    )
    target.add_argument(
        "--no-sched-batch",
        action="store_true",
        help="--spawn: [worker] sched_batch = false, the workers' wake-ups preempt each "
        "other's decodes (the kernel's default policy)",
    )
    target.add_argument(
        "--decode-slots",
        type=int,
        default=0,
        help="--spawn: [worker] decode_slots, how many forked workers decode at once "
        "(0: one per core)",
    )
    target.add_argument(
        "--trailing-silence-ms",
        type=int,
        default=300,
        help="--spawn and --engine-baseline: [segmentation] trailing_silence_ms, how much of "
        "a pause goes to the engine before speech resumes (6000: all of it)",
    )
    target.add_argument(
        "--pause-hint-ms",
        type=int,
        default=500,
        help="--spawn: [segmentation] pause_hint_ms, how long a pause is when the gateway "
        "tells the worker (a batch final pass starts then)",
    )
    target.add_argument(
        "--nats-monitor-port",
        type=int,
        default=0,
        help="--spawn: enable nats-server HTTP monitoring on this port (for diagnosis)",
    )
    target.add_argument(
        "--idle-timeout",
        type=float,
        default=10.0,
        help="--spawn: server.idle_timeout_s (raised automatically for --idle-sessions)",
    )

    load = b.add_argument_group("load")
    load.add_argument("--sessions", "-n", type=int, default=10, help="concurrent sessions")
    load.add_argument(
        "--duration", type=float, default=30.0, help="audio per session, s (whole recordings)"
    )
    load.add_argument("--ramp", type=float, default=5.0, help="sessions start over this many s")
    load.add_argument("--frame-ms", type=int, default=100, help="audio per frame (20..100 ms)")
    load.add_argument("--speed", type=float, default=1.0, help="times real time")
    load.add_argument(
        "--max-sentence-silence",
        type=int,
        default=800,
        metavar="MS",
        help="the sessions' max_sentence_silence (default 800)",
    )
    load.add_argument(
        "--gap-ms", type=int, default=None, help="silence after each recording (mss + 700)"
    )
    load.add_argument("--data", default=None, help="recordings + *.transcription (tests/data)")
    load.add_argument(
        "--token", default=os.environ.get("ASRD_TOKEN"), help="access token (ASRD_TOKEN)"
    )
    load.add_argument(
        "--appkey",
        default=os.environ.get("ASRD_APPKEY", "default"),
        help="app key of the sessions (ASRD_APPKEY, default 'default')",
    )
    load.add_argument(
        "--processes", type=int, default=1, help="client processes sharing the sessions"
    )
    load.add_argument(
        "--reply-timeout",
        type=float,
        default=30.0,
        help="s to wait for the connection, TranscriptionStarted, and the end after the stop",
    )
    load.add_argument("--sample-interval", type=float, default=1.0, help="RSS sampling, s")
    load.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run wait up to S seconds for the machine to be idle "
        "(< 0.15 busy cores besides the stack) - for shared machines",
    )

    load.add_argument(
        "--retry-noisy",
        type=int,
        default=0,
        metavar="N",
        help="rerun a run that did not hold real time, up to N times, while other jobs used "
        "more than --noise-limit cores during it (keeps the cleanest)",
    )
    load.add_argument(
        "--noise-limit",
        type=float,
        default=0.25,
        metavar="CORES",
        help="--retry-noisy: a run with more other load than this is noisy (default 0.25)",
    )

    modes = b.add_argument_group("modes")
    modes.add_argument(
        "--find-capacity",
        action="store_true",
        help="raise the sessions until real time is lost; report the largest N that held",
    )
    modes.add_argument("--start", type=int, default=None, help="capacity search: first N")
    modes.add_argument("--max", type=int, default=4000, help="capacity search: largest N")
    modes.add_argument(
        "--resolution", type=float, default=0.05, help="capacity search: stop at this precision"
    )
    modes.add_argument("--settle", type=float, default=3.0, help="pause between runs, s")
    modes.add_argument(
        "--lag-limit-ms",
        type=float,
        default=300.0,
        help="a run holds real time when every session's p95 partial lag stays below this",
    )
    modes.add_argument(
        "--idle-sessions",
        type=int,
        default=0,
        metavar="N",
        help="measure gateway RSS per idle connection / started session with N of them",
    )
    modes.add_argument(
        "--engine-baseline",
        action="store_true",
        help="decode the recordings with pocketsphinx directly (no service) and report RTF",
    )
    modes.add_argument(
        "--baseline-repeat",
        type=int,
        default=3,
        help="times the raw decoder is measured (the median is kept); the bench sessions, "
        "one starting at each recording and --duration long, are decoded once",
    )

    out = b.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the JSON report instead")
    out.add_argument("--output", "-o", help="also write the JSON report to this file")
    out.add_argument(
        "--tables",
        nargs="+",
        metavar="REPORT.json",
        help="run nothing: print saved JSON reports as markdown tables (docs/benchmarks.md)",
    )
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.tables:
        reports = [json.loads(Path(p).read_text()) for p in args.tables]
        print(markdown_tables(reports))
        return 0
    problems = _check_args(args)
    if problems:
        for p in problems:
            print(f"asrd bench: {p}", file=sys.stderr)
        return 2
    report = trio.run(_main, args)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print(report_text(report))
    return 0


def _check_args(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.url and args.spawn:
        problems.append("use either --url or --spawn")
    if not (args.url or args.spawn or args.engine_baseline):
        problems.append("nothing to do: give --url, --spawn or --engine-baseline")
    if args.sessions < 1:
        problems.append("--sessions must be at least 1")
    if not 20 <= args.frame_ms <= 100:
        problems.append("--frame-ms must be 20..100 (ms of audio per WebSocket frame)")
    if args.speed <= 0:
        problems.append("--speed must be positive")
    if args.processes < 1:
        problems.append("--processes must be at least 1")
    if args.gap_ms is not None and args.gap_ms < args.max_sentence_silence + 100:
        problems.append("--gap-ms must exceed --max-sentence-silence by 100 ms at least")
    if args.spawn and args.decoders > MAX_DECODERS:
        problems.append(
            f"--decoders is at most {MAX_DECODERS} per worker "
            "(config.WorkerConfig): use more --workers"
        )
    return problems


def gap_ms(args: argparse.Namespace) -> int:
    return int(args.gap_ms if args.gap_ms is not None else args.max_sentence_silence + 700)


# --- orchestration -----------------------------------------------------------------------


@asynccontextmanager
async def open_target(args: argparse.Namespace) -> AsyncIterator[Target]:
    if args.url:
        yield Target(args.url, ProcSet(parse_pids(args.pids)), None, None)
        return
    idle_timeout = args.idle_timeout
    if args.idle_sessions:
        idle_timeout = max(idle_timeout, 600.0)
    config = StackConfig(
        engine=args.engine,
        gateways=args.gateways,
        workers=args.workers,
        decoders=args.decoders,
        shared_workers=not args.separate_workers,
        final_pass=args.final_pass,
        idle_timeout_s=idle_timeout,
        max_sessions=100_000,
        nats_monitor_port=args.nats_monitor_port,
        extra={
            "worker": {
                "decode_slots": args.decode_slots,
                "early_final": not args.no_early_final,
                "sched_batch": not args.no_sched_batch,
            },
            "segmentation": {
                "trailing_silence_ms": args.trailing_silence_ms,
                "pause_hint_ms": args.pause_hint_ms,
            },
        },
    )
    async with open_stack(config) as stack:
        yield Target(stack.url, stack.procs, config, config.workers * config.decoders)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(args.data) if args.data else default_data_dir()
    corpus = load_corpus(data_dir)
    report: dict[str, Any] = {"machine": machine_info()}
    baseline: Baseline | None = None
    if args.engine_baseline:
        baseline = await _baseline(args, corpus, "engine baseline")
        report["engine_baseline"] = baseline.as_dict()
    if not (args.url or args.spawn):
        return report
    async with open_target(args) as target:
        if target.stack is not None:
            report["stack"] = {
                "engine": target.stack.engine,
                "gateways": target.stack.gateways,
                "workers": target.stack.workers,
                "decoders": target.stack.decoders,
                "shared_workers": target.stack.shared_workers,
                "decode_slots": args.decode_slots,
                "final_pass": target.stack.final_pass,
                "early_final": target.stack.extra["worker"]["early_final"],
                "sched_batch": target.stack.extra["worker"]["sched_batch"],
                "trailing_silence_ms": target.stack.extra["segmentation"]["trailing_silence_ms"],
                "pause_hint_ms": target.stack.extra["segmentation"]["pause_hint_ms"],
                "idle_timeout_s": target.stack.idle_timeout_s,
            }
        if args.idle_sessions:
            report["idle"] = await idle_memory(args, target)
        elif args.find_capacity:
            report.update(await find_capacity(args, target, corpus, baseline))
        else:
            warn_capacity(args.sessions, target)
            report["runs"] = [await one_run(args, target, corpus, args.sessions, baseline)]
    if baseline is not None:
        # The machine's speed drifts within minutes (docs/benchmarks.md): measuring the
        # engine again once the service has run brackets the figures between two limits.
        after = await _baseline(args, corpus, "engine baseline, after the runs")
        report["engine_baseline_after"] = after.as_dict()
        if "capacity" in report:
            cap = report["capacity"]
            cap.update(_vs_limit(cap["held_sessions"], after, suffix="_after"))
    return report


async def _baseline(args: argparse.Namespace, corpus: Corpus, what: str) -> Baseline:
    if args.quiet_wait > 0:
        await wait_quiet(args.quiet_wait)
    print(f"{what}: decoding with pocketsphinx ...", file=sys.stderr)
    return run_baseline(
        corpus,
        final_pass=args.final_pass,
        gap_ms=gap_ms(args),
        max_sentence_silence_ms=args.max_sentence_silence,
        trailing_silence_ms=args.trailing_silence_ms,
        session_s=args.duration,
        repeat=args.baseline_repeat,
    )


async def one_run(
    args: argparse.Namespace,
    target: Target,
    corpus: Corpus,
    n: int,
    baseline: Baseline | None,
) -> dict[str, Any]:
    """A run of ``n`` sessions; with ``--retry-noisy``, a run that did not hold is repeated
    while other jobs disturbed it. A run that held is kept as it is, even if disturbed (its
    figures are then pessimistic); of runs that did not hold, the least disturbed."""
    best: dict[str, Any] | None = None
    for attempt in range(1, args.retry_noisy + 2):
        rep = await _one_attempt(args, target, corpus, n, baseline)
        rep["attempts"] = attempt
        if rep["held"]:
            return rep
        other = rep["machine_load"]["other_cores"] or 0.0
        if best is None or other < (best["machine_load"]["other_cores"] or 0.0):
            best = rep
        best["attempts"] = attempt
        if other <= args.noise_limit:
            break  # clean: it did not hold on its own account
        print(f"run disturbed by other jobs ({other:.2f} cores): again", file=sys.stderr)
        await trio.sleep(args.settle)
    assert best is not None
    return best


async def _one_attempt(
    args: argparse.Namespace,
    target: Target,
    corpus: Corpus,
    n: int,
    baseline: Baseline | None,
) -> dict[str, Any]:
    if args.quiet_wait > 0:
        await wait_quiet(args.quiet_wait)
    processes = min(args.processes, n)
    lead_s = 1.0 if processes == 1 else 3.0  # shards need time to start
    start_at = time.monotonic() + lead_s
    ramp = min(args.ramp, args.duration) if n > 1 else 0.0
    plan = LoadPlan(
        url=target.url,
        sessions=schedule(n, start_at=start_at, ramp_s=ramp),
        data_dir=str(Path(args.data) if args.data else default_data_dir()),
        duration_s=args.duration,
        frame_ms=args.frame_ms,
        speed=args.speed,
        gap_ms=gap_ms(args),
        max_sentence_silence_ms=args.max_sentence_silence,
        token=args.token,
        appkey=args.appkey,
        reply_timeout_s=args.reply_timeout,
    )
    print(f"run: {n} sessions ({processes} client processes) ...", file=sys.stderr)
    sampler = Sampler(target.procs, args.sample_interval)
    results: list[SessionResult] = []
    client_cpu = 0.0
    async with trio.open_nursery() as nursery:
        if processes == 1:
            await trio.sleep_until(trio.current_time() + (start_at - time.monotonic()))
            sampler.start()
            nursery.start_soon(sampler.run)
            cpu0 = time.process_time()
            results = await run_load(plan, corpus)
            client_cpu = time.process_time() - cpu0
        else:
            results, client_cpu = await _run_shards(plan, processes, sampler, nursery, start_at)
        sampler.stop()
        nursery.cancel_scope.cancel()
    wall_s = time.monotonic() - start_at
    run_info = {
        "sessions": n,
        "duration_s": args.duration,
        "ramp_s": ramp,
        "frame_ms": args.frame_ms,
        "speed": args.speed,
        "max_sentence_silence_ms": args.max_sentence_silence,
        "gap_ms": gap_ms(args),
        "client_processes": processes,
        "url": target.url,
    }
    rep = build_report(
        results,
        usage=sampler.usage(),
        machine_busy_s=sampler.machine_busy_s,
        machine_steal_s=sampler.machine_steal_s,
        client_cpu_s=client_cpu,
        client_processes=processes,
        wall_s=wall_s,
        run=run_info,
        criteria=HoldCriteria(args.lag_limit_ms),
    )
    rep["series"] = sampler.series
    if args.duration >= 120:  # long enough to say whether memory stays flat
        rep["rss_growth"] = rss_growth(sampler.series, warmup_s=max(60.0, ramp + 30.0))
    if baseline is not None:
        rep["vs_engine_baseline"] = vs_baseline(rep, baseline)
    print(format_reports([rep]), file=sys.stderr)
    return rep


async def wait_quiet(timeout_s: float, threshold_cores: float = 0.15) -> bool:
    """Wait until the machine's busy CPU stays under ``threshold_cores`` for 2 s."""
    deadline = time.monotonic() + timeout_s
    quiet_since: float | None = None
    last = machine_busy_s()
    while time.monotonic() < deadline:
        await trio.sleep(0.5)
        now = machine_busy_s()
        busy = (now - last) / 0.5
        last = now
        if busy < threshold_cores:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 2.0:
                return True
        else:
            quiet_since = None
    print(f"asrd bench: the machine did not become idle within {timeout_s:g} s", file=sys.stderr)
    return False


async def _run_shards(
    plan: LoadPlan,
    processes: int,
    sampler: Sampler,
    nursery: trio.Nursery,
    start_at: float,
) -> tuple[list[SessionResult], float]:
    outputs: list[bytes] = []

    async def shard(sessions: tuple[Any, ...]) -> None:
        shard_plan = replace(plan, sessions=sessions)
        proc = await trio.run_process(
            [sys.executable, "-m", "asrd.bench.shard"],
            stdin=shard_plan.to_json().encode(),
            capture_stdout=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"client shard exited with status {proc.returncode}")
        outputs.append(proc.stdout)

    async with trio.open_nursery() as shards:
        for part in split(plan.sessions, processes):
            shards.start_soon(shard, part)
        await trio.sleep_until(trio.current_time() + (start_at - time.monotonic()))
        sampler.start()
        nursery.start_soon(sampler.run)
    results: list[SessionResult] = []
    cpu = 0.0
    for raw in outputs:
        obj = json.loads(raw)
        cpu += float(obj["cpu_s"])
        results += [SessionResult.from_dict(r) for r in obj["results"]]
    results.sort(key=lambda r: r.index)
    return results, cpu


def vs_baseline(rep: dict[str, Any], baseline: Baseline) -> dict[str, Any]:
    limit = baseline.engine_limit_streams
    out: dict[str, Any] = {
        "engine_limit_streams": round(limit, 1),
        "streams_ratio": round(rep["sessions"]["requested"] / limit, 3),
    }
    worker = rep["procs"].get("worker")
    if worker and worker["cpu_ms_per_audio_s"] is not None:
        engine_ms = 1000 * baseline.workload_cpu_per_s
        out["worker_cpu_vs_engine"] = round(worker["cpu_ms_per_audio_s"] / engine_ms, 3)
    return out


async def find_capacity(
    args: argparse.Namespace, target: Target, corpus: Corpus, baseline: Baseline | None
) -> dict[str, Any]:
    """Double N while runs hold, then bisect between the last that held and the first that
    did not, until they are within ``--resolution`` (relative) or 1 session."""
    n = args.start or (1 if args.engine == "pocketsphinx" and args.spawn else 10)
    held_n = 0
    failed_n: int | None = None
    steps: list[dict[str, Any]] = []
    for _ in range(MAX_CAPACITY_STEPS):
        warn_capacity(n, target)
        rep = await one_run(args, target, corpus, n, baseline)
        steps.append(rep)
        if rep["held"]:
            held_n = max(held_n, n)
        else:
            failed_n = n if failed_n is None else min(failed_n, n)
        if failed_n is None:
            if n >= args.max:
                break
            nxt = min(n * 2, args.max)
        else:
            if failed_n - held_n <= max(1, math.floor(held_n * args.resolution)):
                break
            nxt = (held_n + failed_n) // 2
        if nxt <= 0 or nxt == n:
            break
        n = nxt
        await trio.sleep(args.settle)
    out: dict[str, Any] = {
        "capacity": {
            "held_sessions": held_n,
            "first_failed_sessions": failed_n,
            "lag_p95_limit_ms": args.lag_limit_ms,
        },
        "runs": steps,
    }
    if baseline is not None:
        out["capacity"].update(_vs_limit(held_n, baseline))
    return out


def _vs_limit(held: int, baseline: Baseline, suffix: str = "") -> dict[str, Any]:
    """The streams held as a share of the engine's own limit."""
    limit = baseline.engine_limit_streams
    return {
        f"engine_limit_streams{suffix}": round(limit, 1),
        f"ratio_to_engine_limit{suffix}": round(held / limit, 3) if limit else None,
    }
