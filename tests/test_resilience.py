"""Fault injection against real processes: workers killed or drained mid-sentence, nats-server
restarted mid-stream, clients that stop reading. The client must see the same sentences, each
once, with the same indexes and times as an undisturbed run.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from asrd import wire
from asrd.bus import BusTimeout, NoResponders, claim_subject
from asrd.bus.natsbus import open_nats_bus
from asrd.client import TranscribeError, open_transcription
from asrd.config import NatsConfig, WorkerConfig
from asrd.engines.loadtest import LoadtestEngine
from asrd.errors import TooManyRequests
from asrd.worker import Worker
from tests.audio_fixtures import Clip, assemble, load_clip, silence
from tests.conftest import Nats, Pool, RunningGateway, open_gateway
from tests.servers import nats_server, restart_nats, start_worker, stop

pytestmark = pytest.mark.integration
GUARD_S = 180
RATE = 16000


def recording() -> bytes:
    pcm, _ = assemble(
        [
            silence(500, RATE),
            Clip(load_clip("0880")),
            silence(1200, RATE),
            Clip(load_clip("0930")),
            silence(1200, RATE),
            Clip(load_clip("0880")),
            silence(1200, RATE),
        ],
        RATE,
    )
    return pcm


def sentences(events: list[dict[str, Any]]) -> list[tuple[int, int, int, str]]:
    return [
        (p["index"], p["begin_time"], p["time"], p["result"])
        for e in events
        if e["header"]["name"] == "SentenceEnd"
        for p in [e["payload"]]
    ]


Trigger = Callable[[RunningGateway], None]


async def stream(
    gw: RunningGateway,
    pcm: bytes,
    *,
    at_sentence: int = 0,
    delay_s: float = 1.0,
    fault: Trigger | None = None,
    realtime: bool = True,
) -> list[dict[str, Any]]:
    """Stream ``pcm``; ``delay_s`` after SentenceBegin ``at_sentence`` inject ``fault``."""
    events: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        with trio.fail_after(GUARD_S):
            async with open_transcription(
                gw.url,
                pcm,
                RATE,
                token="t",
                appkey="default",
                realtime=realtime,
                params={"enable_intermediate_result": True},
            ) as tr:
                async for event in tr:
                    events.append(event)
                    header, payload = event["header"], event.get("payload", {})
                    if (
                        fault is not None
                        and header["name"] == "SentenceBegin"
                        and payload["index"] == at_sentence
                    ):

                        async def inject(f: Trigger = fault) -> None:
                            await trio.sleep(delay_s)
                            f(gw)

                        nursery.start_soon(inject)
    return events


def busy_worker_pid(gw: RunningGateway, pool: str) -> int:
    """The pid of the worker of ``pool`` that has no free decoder (it serves the session)."""
    busy = [b for b in gw.gateway.registry.alive(pool) if b.free == 0]
    assert len(busy) == 1, busy
    return int(busy[0].worker_id.split("-")[-2])


@pytest.fixture
def two_workers(nats: Nats) -> Iterator[Pool]:
    workers = [start_worker(nats.url, "it-failover", 1) for _ in range(2)]
    yield Pool("it-failover", workers, 1)
    for w in workers:
        stop(w)


def check_same_sentences(
    disturbed: list[dict[str, Any]], undisturbed: list[dict[str, Any]]
) -> None:
    names = [e["header"]["name"] for e in disturbed]
    assert "TaskFailed" not in names and names[-1] == "TranscriptionCompleted"
    got, want = sentences(disturbed), sentences(undisturbed)
    assert [s[0] for s in got] == list(range(1, len(want) + 1))  # each index exactly once
    assert got == want


async def test_sigkill_worker_mid_sentence_loses_nothing(nats: Nats, two_workers: Pool) -> None:
    pcm = recording()
    async with open_gateway(nats.url, two_workers) as gw:
        undisturbed = await stream(gw, pcm, realtime=False)
        assert len(sentences(undisturbed)) == 3

        def kill(gw: RunningGateway) -> None:
            pid = busy_worker_pid(gw, two_workers.name)
            for w in two_workers.workers:
                if w.pid == pid:
                    w.send_signal(signal.SIGKILL)

        disturbed = await stream(gw, pcm, at_sentence=2, fault=kill)
    check_same_sentences(disturbed, undisturbed)
    assert sum(w.poll() is not None for w in two_workers.workers) == 1


async def test_sigterm_worker_hands_its_session_over(nats: Nats, two_workers: Pool) -> None:
    pcm = recording()
    async with open_gateway(nats.url, two_workers) as gw:
        undisturbed = await stream(gw, pcm, realtime=False)

        def terminate(gw: RunningGateway) -> None:
            pid = busy_worker_pid(gw, two_workers.name)
            for w in two_workers.workers:
                if w.pid == pid:
                    w.send_signal(signal.SIGTERM)

        disturbed = await stream(gw, pcm, at_sentence=2, fault=terminate)
    check_same_sentences(disturbed, undisturbed)
    stopped = [w for w in two_workers.workers if w.poll() is not None]
    assert len(stopped) == 1 and stopped[0].returncode == 0


async def test_no_worker_left_gives_a_clear_error_in_bounded_time(nats: Nats) -> None:
    worker = start_worker(nats.url, "it-last", 1)
    pool = Pool("it-last", [worker], 1)
    try:
        async with open_gateway(nats.url, pool, server={"failover_timeout_s": 1.0}) as gw:
            errors: list[TranscribeError] = []
            try:
                await stream(
                    gw, recording(), at_sentence=1, delay_s=0.5, fault=lambda gw: worker.kill()
                )
            except* TranscribeError as group:
                errors += [e for e in group.exceptions if isinstance(e, TranscribeError)]
            assert [e.code for e in errors] == [50000000]
            assert "no engine worker took the session" in errors[0].reason
    finally:
        stop(worker)


def test_nats_restart_mid_stream_loses_nothing() -> None:
    async def main(url: str, port: int, holder: list[subprocess.Popen[bytes]]) -> None:
        worker = start_worker(url, "it-natsdown", 1)
        pool = Pool("it-natsdown", [worker], 1)
        try:
            async with open_gateway(url, pool) as gw:
                pcm = recording()
                undisturbed = await stream(gw, pcm, realtime=False)

                async def bounce() -> None:
                    holder[0].terminate()
                    holder[0].wait()
                    await trio.sleep(2.0)
                    holder[0] = restart_nats(port)

                def fault(gw: RunningGateway) -> None:
                    nursery.start_soon(bounce)

                async with trio.open_nursery() as nursery:
                    disturbed = await stream(gw, pcm, at_sentence=2, fault=fault)
            check_same_sentences(disturbed, undisturbed)
        finally:
            stop(worker)

    with nats_server() as (proc, url, port):
        holder = [proc]
        try:
            trio.run(main, url, port, holder)
        finally:
            stop(holder[0])


async def test_gateway_drain_lets_running_sessions_finish(nats: Nats, pool: Pool) -> None:
    pcm = recording()
    async with open_gateway(nats.url, pool, server={"shutdown_grace_s": 120}) as gw:
        undisturbed = await stream(gw, pcm, realtime=False)
        refused: list[BaseException] = []

        def drain(gw: RunningGateway) -> None:
            gw.gateway.stop_requested.set()

        async def connect_during_drain() -> None:
            await gw.gateway.stop_requested.wait()
            await trio.sleep(0.5)
            try:
                await stream(gw, pcm, realtime=False)
            except BaseException as exc:  # refused: the listener is closed
                refused.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect_during_drain)
            disturbed = await stream(gw, pcm, at_sentence=1, delay_s=0.5, fault=drain)
        check_same_sentences(disturbed, undisturbed)
        assert refused


async def test_claims_racing_a_worker_that_fills_up_are_all_answered(nats: Nats) -> None:
    """A worker that fills up unsubscribes from claims; a claim already on its way to it must
    still be answered "busy", not dropped (the gateway would wait out its claim timeout and
    fail the client with 50000000 although the worker is alive)."""
    rounds, claims_per_round = 8, 40
    subject = claim_subject("asrd", "it-race")
    outcomes: list[str] = []
    async with open_nats_bus(NatsConfig(), nats.url, name="test-claimer") as client:
        for r in range(rounds):
            async with (
                open_nats_bus(NatsConfig(), nats.url, name="test-worker") as bus,
                trio.open_nursery() as nursery,
            ):
                worker = Worker(
                    WorkerConfig(pool="it-race", decoders=1), "asrd", bus, LoadtestEngine(1)
                )
                await nursery.start(worker.run)

                async def claim(session_id: str, delay_s: float) -> None:
                    await trio.sleep(delay_s)  # some reach the worker as it unsubscribes
                    data = wire.Claim(session_id, RATE, False).encode()
                    try:
                        reply = wire.decode_claim_reply(await client.request(subject, data, 2.0))
                        outcomes.append("ok" if reply.ok else f"refused {reply.code}")
                    except NoResponders:
                        outcomes.append("no responders")
                    except BusTimeout:
                        outcomes.append("timeout")

                async with trio.open_nursery() as claims:
                    for i in range(claims_per_round):
                        claims.start_soon(claim, f"race-{r}-{i}", i * 0.0002)
                nursery.cancel_scope.cancel()
    assert "timeout" not in outcomes
    assert outcomes.count("ok") == rounds
    assert set(outcomes) <= {"ok", "no responders", f"refused {TooManyRequests.code}"}
