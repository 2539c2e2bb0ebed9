"""Measure what a client sees, and how fast asrd recovers, under injected faults.

    .venv/bin/python bench/faults.py

Runs a real nats-server, two pocketsphinx workers (1 decoder each) and a gateway; streams a
three-sentence recording at real time, injects each fault 1 s into sentence 2, and prints:
the events the client saw (errors, sentences), whether the transcript equals the undisturbed
one, the detection time (fault -> gateway notices) and the recovery time (fault -> the next
result reaches the client). Results are recorded in docs/resilience.md.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import Pool, open_gateway
from tests.servers import nats_server, restart_nats, start_worker, stop
from tests.test_resilience import recording, sentences

from asrd.client import open_transcription, pcm_chunks


async def run(gw: Any, pcm: bytes, fault: Any = None) -> tuple[list[Any], float, float]:
    events: list[tuple[float, dict[str, Any]]] = []
    t_fault = 0.0
    async with trio.open_nursery() as nursery:
        async with open_transcription(
            gw.url,
            pcm_chunks(pcm),
            16000,
            token="t",
            appkey="default",
            realtime=fault is not None,
            params={"enable_intermediate_result": True},
        ) as tr:
            async for e in tr:
                events.append((time.monotonic(), e))
                if fault and e["header"]["name"] == "SentenceBegin" and e["payload"]["index"] == 2:

                    async def inject() -> None:
                        nonlocal t_fault
                        await trio.sleep(1.0)
                        t_fault = time.monotonic()
                        await fault(gw)

                    nursery.start_soon(inject)
    after = [
        t
        for t, e in events
        if t_fault
        and t > t_fault
        and e["header"]["name"] in ("TranscriptionResultChanged", "SentenceEnd")
    ]
    recovery = (after[0] - t_fault) if after else float("nan")
    return [e for _, e in events], t_fault, recovery


async def main(url: str, port: int, holder: list[Any]) -> None:
    workers = [start_worker(url, "faults", 1) for _ in range(2)]
    pool = Pool("faults", workers, 1)
    pcm = recording()
    try:
        async with open_gateway(url, pool) as gw:
            base, _, _ = await run(gw, pcm)

            def busy_pid() -> int:
                busy = [b for b in gw.gateway.registry.alive(pool.name) if b.free == 0]
                return int(busy[0].worker_id.split("-")[-2])

            async def sigkill(gw: Any) -> None:
                pid = busy_pid()
                next(w for w in workers if w.pid == pid).send_signal(signal.SIGKILL)

            async def sigterm(gw: Any) -> None:
                pid = busy_pid()
                next(w for w in workers if w.pid == pid).send_signal(signal.SIGTERM)

            async def nats_bounce(gw: Any) -> None:
                holder[0].terminate()
                holder[0].wait()
                await trio.sleep(2.0)
                holder[0] = restart_nats(port)

            for name, fault in (
                ("SIGKILL worker", sigkill),
                ("SIGTERM worker", sigterm),
                ("nats-server down 2 s", nats_bounce),
            ):
                events, _, recovery = await run(gw, pcm, fault)
                names = [e["header"]["name"] for e in events]
                same = sentences(events) == sentences(base)
                print(
                    f"{name:22s} errors={names.count('TaskFailed')} "
                    f"sentences={names.count('SentenceEnd')} identical={same} "
                    f"recovery={recovery * 1000:.0f} ms"
                )
                # put the pool back to two workers
                for i, w in enumerate(workers):
                    if w.poll() is not None:
                        workers[i] = start_worker(url, "faults", 1)
                await trio.sleep(3.0)
    finally:
        for w in workers:
            stop(w)


if __name__ == "__main__":
    with nats_server() as (proc, url, port):
        holder = [proc]
        try:
            trio.run(main, url, port, holder)
        finally:
            stop(holder[0])
