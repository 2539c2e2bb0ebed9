"""``asrd bench --idle-sessions``: what an idle connection and a started, silent session cost
the gateway (and the workers and nats-server), read as RSS from /proc."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import trio
import trio_websocket

from asrd.bench.stack import Target, warn_capacity
from asrd.client import start_message

__all__ = ["idle_memory"]


async def idle_memory(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """Gateway (and worker) RSS per idle WebSocket connection and per started, silent session.

    A warm-up round first (so one-time allocations are not counted), then: N connections
    opened, RSS read; ``StartTranscription`` on each (each claims a decoder), RSS read; all
    closed. Everything happens well within the gateway's ``idle_timeout_s``.
    """
    n = args.idle_sessions
    warn_capacity(n, target)
    warm = min(n, 20)
    await _idle_round(args, target, warm, measure=False)
    await trio.sleep(args.settle)
    return await _idle_round(args, target, n, measure=True)


async def _idle_round(
    args: argparse.Namespace, target: Target, n: int, *, measure: bool
) -> dict[str, Any]:
    limiter = trio.CapacityLimiter(50)  # connections being opened at once
    connected = 0
    started = 0
    failures: dict[str, int] = {}
    all_connected = trio.Event()
    all_started = trio.Event()
    go_start = trio.Event()
    release = trio.Event()
    done = 0
    all_done = trio.Event()

    def settle_counts() -> None:
        if connected + sum(failures.values()) >= n:
            all_connected.set()
        if started + sum(failures.values()) >= n:
            all_started.set()
        if done >= n:
            all_done.set()

    async def one(i: int) -> None:
        nonlocal connected, started, done
        outcome = ""
        try:
            async with limiter:
                ws_cm = trio_websocket.open_websocket_url(
                    target.url, connect_timeout=args.reply_timeout, disconnect_timeout=5
                )
                ws = await ws_cm.__aenter__()
            try:
                connected += 1
                settle_counts()
                await go_start.wait()
                message = start_message(f"{i:032x}", args.appkey, 16000)
                await ws.send_message(json.dumps(message))
                with trio.fail_after(args.reply_timeout):
                    reply = json.loads(await ws.get_message())
                name = reply["header"]["name"]
                if name != "TranscriptionStarted":
                    outcome = str(reply["header"].get("status", name))
                else:
                    started += 1
                    settle_counts()
                    await release.wait()
            finally:
                await ws_cm.__aexit__(None, None, None)
        except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError) as exc:
            outcome = type(exc).__name__
        except trio.TooSlowError:
            outcome = "timeout"
        if outcome:
            failures[outcome] = failures.get(outcome, 0) + 1
        done += 1
        settle_counts()

    before = target.procs.read()
    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
        await all_connected.wait()
        await trio.sleep(1.0)
        connected_reading = target.procs.read()
        t_connected = time.monotonic() - t0
        go_start.set()
        await all_started.wait()
        await trio.sleep(1.0)
        started_reading = target.procs.read()
        t_started = time.monotonic() - t0
        release.set()
        await all_done.wait()
    if not measure:
        return {}

    def rss(reading: dict[str, Any], role: str) -> int:
        return sum(s.rss_kb for s in reading.get(role, []) if s)

    out: dict[str, Any] = {
        "sessions": n,
        "connected": connected,
        "started": started,
        "failed": failures,
        "seconds_to_connect_all": round(t_connected, 1),
        "seconds_to_start_all": round(t_started, 1),
        "idle_timeout_s": target.stack.idle_timeout_s if target.stack else None,
    }
    for role in target.procs.roles:
        b, c, s = rss(before, role), rss(connected_reading, role), rss(started_reading, role)
        out[role] = {
            "rss_mb_before": round(b / 1024, 1),
            "rss_mb_connected": round(c / 1024, 1),
            "rss_mb_started": round(s / 1024, 1),
            "kb_per_connection": round((c - b) / max(1, connected), 1),
            "kb_per_started_session": round((s - b) / max(1, started), 1),
        }
    print(json.dumps(out, indent=2), file=sys.stderr)
    return out
