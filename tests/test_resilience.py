"""Fault injection against real processes: workers killed or drained mid-sentence, nats-server
restarted mid-stream, clients that stop reading. The client must see the same sentences, each
once, with the same indexes and times as an undisturbed run.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from asrd.bus import Bus, NoResponders
from asrd.bus.natsbus import open_nats_bus
from asrd.client import TranscribeError, open_transcription, pcm_chunks
from asrd.config import NatsConfig, WorkerConfig
from asrd.engines.loadtest import LoadtestEngine
from asrd.errors import AsrdError, BusError, TooManyRequests
from asrd.registry import WorkerRegistry
from asrd.remote import RemoteRecognizer
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
                pcm_chunks(pcm),
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


async def test_sigterm_worker_hands_its_session_over(
    nats: Nats, two_workers: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker asked to stop gives its session back and says goodbye: the gateway moves the
    session and forgets the worker, with no warning (nothing went wrong)."""
    caplog.set_level(logging.INFO, logger="asrd")
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
    gateway_lines = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name in ("asrd.registry", "asrd.remote")
    ]
    # its handoff and its goodbye may be read in either order
    assert any(
        level == logging.INFO and "claiming a worker again" in m for level, m in gateway_lines
    ), gateway_lines
    assert any(level == logging.INFO and m.endswith(" left") for level, m in gateway_lines), (
        gateway_lines
    )
    assert not [m for level, m in gateway_lines if level >= logging.WARNING], gateway_lines


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


class LinkProxy:
    """A TCP proxy in front of nats-server for one process, whose link a test can cut: a
    network blip on that process's NATS connection only."""

    def __init__(self) -> None:
        self.port = 0
        self._links: list[trio.CancelScope] = []
        self._down_until = 0.0

    def cut(self, down_s: float) -> None:
        """Drop every connection now, and refuse new ones for ``down_s``."""
        self._down_until = trio.current_time() + down_s
        for link in self._links:
            link.cancel()
        self._links.clear()

    async def serve(self, target_port: int, *, task_status: trio.TaskStatus[None]) -> None:
        async def pipe(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await src.receive_some(65536):
                    await dst.send_all(data)

        async def link(client: trio.SocketStream) -> None:
            async with client:
                if trio.current_time() < self._down_until:
                    return  # still down
                with trio.CancelScope() as scope:
                    self._links.append(scope)
                    async with await trio.open_tcp_stream("127.0.0.1", target_port) as server:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(pipe, client, server)
                            nursery.start_soon(pipe, server, client)

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(link, listeners)


async def test_a_blip_on_the_workers_own_nats_link_loses_nothing(nats: Nats) -> None:
    """Only the worker's connection drops, for half a second mid-sentence: the gateway's link
    stays up and never hears of it. The worker gives the session back when its link returns,
    and the gateway replays what it sent meanwhile."""
    config = WorkerConfig(engine="loadtest", decoders=1, pool="it-blip")
    proxy = LinkProxy()
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve, nats.port)
        proxied = f"nats://127.0.0.1:{proxy.port}"
        async with open_nats_bus(NatsConfig(), proxied, name="blip-worker") as worker_bus:
            worker = Worker(config, "asrd", worker_bus, LoadtestEngine(1))
            await nursery.start(worker.run)
            async with open_gateway(nats.url, Pool("it-blip", [], 1)) as gw:
                with trio.fail_after(GUARD_S):
                    while not gw.gateway.registry.alive("it-blip"):  # noqa: ASYNC110
                        await trio.sleep(0.05)
                pcm = recording()
                undisturbed = await stream(gw, pcm, realtime=False)
                disturbed = await stream(
                    gw, pcm, at_sentence=2, delay_s=1.0, fault=lambda gw: proxy.cut(0.5)
                )
                assert worker_bus.reconnects == 1 and gw.gateway.state.bus.reconnects == 0
        nursery.cancel_scope.cancel()
    check_same_sentences(disturbed, undisturbed)


async def test_gateway_drain_lets_running_sessions_finish(nats: Nats, pool: Pool) -> None:
    pcm = recording()
    async with open_gateway(nats.url, pool, server={"shutdown_grace_s": 120}) as gw:
        undisturbed = await stream(gw, pcm, realtime=False)
        refused: list[TranscribeError] = []

        def drain(gw: RunningGateway) -> None:
            gw.gateway.stop_requested.set()

        async def connect_during_drain() -> None:
            await gw.gateway.stop_requested.wait()
            await trio.sleep(0.5)
            try:
                await stream(gw, pcm, realtime=False)
            except* TranscribeError as group:  # refused: the listener is closed
                refused.extend(e for e in group.exceptions if isinstance(e, TranscribeError))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect_during_drain)
            disturbed = await stream(gw, pcm, at_sentence=1, delay_s=0.5, fault=drain)
        check_same_sentences(disturbed, undisturbed)
        assert refused and all("cannot connect" in e.reason for e in refused), refused


async def test_a_drained_subscription_still_delivers_what_was_sent_to_it(nats: Nats) -> None:
    """UNSUB, round-trip, end: messages the server sent before it saw the UNSUB arrive."""
    async with open_nats_bus(NatsConfig(), nats.url, name="test-drain") as bus:
        sub = await bus.subscribe("it-drain", max_pending=1000)
        for i in range(500):
            bus.publish("it-drain", str(i).encode())
        await bus.unsubscribe(sub, drain=True)  # after the publishes, so they come back first
        received = []
        with trio.fail_after(GUARD_S):
            try:
                while True:
                    received.append(int((await sub.receive()).data))
            except BusError:
                pass
        assert received == list(range(500))


async def test_periodic_messages_of_two_buses_are_due_at_the_same_times(nats: Nats) -> None:
    """Each bus schedules its beats on the grid of the interval on the monotonic clock, which
    every process of a host shares, not an interval after its own start: so a host's workers
    beat together and a gateway reads their beats in one wake-up."""
    interval = 0.2
    due: dict[str, list[float]] = {"a": [], "b": []}

    def record(bus: Any, name: str) -> None:
        loop = bus._loop
        call_at = loop.call_at

        def recording_call_at(when: float, callback: Any, *args: Any, **kw: Any) -> Any:
            if getattr(callback, "__name__", "") == "beat":
                due[name].append(when)
            return call_at(when, callback, *args, **kw)

        loop.call_at = recording_call_at  # call_later goes through it too

    async with (
        open_nats_bus(NatsConfig(), nats.url, name="beat-a") as a,
        open_nats_bus(NatsConfig(), nats.url, name="beat-b") as b,
    ):
        sub = await a.subscribe("it-beats", max_pending=1000)
        await a.flush()
        record(a, "a")
        record(b, "b")
        stop_a = a.publish_every("it-beats", lambda: b"a", interval)
        await trio.sleep(interval / 3)  # b starts at another phase
        stop_b = b.publish_every("it-beats", lambda: b"b", interval)
        seen = {b"a": 0, b"b": 0}
        with trio.fail_after(GUARD_S):
            while min(seen.values()) < 4:
                seen[(await sub.receive()).data] += 1
        stop_a()
        stop_b()
    for name, times in due.items():
        assert len(times) >= 3, name
        ticks = [when / interval for when in times]
        assert all(abs(t - round(t)) < 1e-6 for t in ticks), (name, times)
        assert ticks == sorted(set(ticks)), (name, times)


async def test_every_nats_failure_counts_as_an_error(
    nats: Nats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asrd_nats_errors_total counted only what the client's callbacks reported: a publish
    refused with the outbox full, or a subscribe that failed, left it at 0."""
    from asrd.bus import natsbus

    async with open_nats_bus(NatsConfig(), nats.url, name="test-errors") as bus:
        with pytest.raises(NoResponders):  # an answer, not an error
            await bus.request("nobody.listens.here", b"", 5.0)
        assert bus.errors == 0
        with monkeypatch.context() as mp:
            mp.setattr(natsbus, "MAX_OUTBOX", 0)
            with pytest.raises(BusError, match="outbox is full"):
                bus.publish("x", b"")
        assert bus.errors == 1
        with pytest.raises(BusError):
            await bus.subscribe("")  # nats-py refuses an empty subject
        assert bus.errors == 2


async def test_a_cancelled_subscribe_or_unsubscribe_is_not_left_half_done(nats: Nats) -> None:
    """A worker's pool change or shutdown can cancel a claim subscribe: the subscription is
    then made and handed back all the same (a lost one would take claims nobody answers), and
    a cancelled unsubscribe still removes it from the server."""
    async with open_nats_bus(NatsConfig(), nats.url, name="test-cancel") as bus:
        made = []
        with trio.CancelScope() as scope:
            scope.cancel()
            made.append(await bus.subscribe("it-cancel", queue="q"))
        assert made, "the subscribe was cancelled half-way"
        bus.publish("it-cancel", b"one")
        with trio.fail_after(GUARD_S):
            assert (await made[0].receive()).data == b"one"
        with trio.CancelScope() as scope:
            scope.cancel()
            await bus.unsubscribe(made[0])
        await bus.flush()
        async with open_nats_bus(NatsConfig(), nats.url, name="test-cancel-2") as other:
            with pytest.raises(NoResponders):  # nobody subscribes to it any more
                await other.request("it-cancel", b"two", timeout=GUARD_S)


async def test_sessions_racing_for_the_last_decoder_get_it_or_busy(nats: Nats) -> None:
    """Many sessions claim a one-decoder worker at once, the gateway's way: one gets it, every
    other one "busy" (40000005), none "no engine worker answered" (50000000). The worker
    drains its claim subscription as it fills up, and a claim NATS still routed to it after
    that (the server can: drain is not atomic across connections) is sent again."""
    rounds, sessions_per_round = 8, 40
    outcomes: list[str] = []
    async with open_nats_bus(NatsConfig(), nats.url, name="test-gateway") as gateway_bus:
        registry = WorkerRegistry(gateway_bus, "asrd", timeout_s=3.0)
        async with trio.open_nursery() as gateway:
            await gateway.start(registry.run)
            for r in range(rounds):
                pool = f"it-race-{r}"
                async with (
                    open_nats_bus(NatsConfig(), nats.url, name="test-worker") as bus,
                    trio.open_nursery() as nursery,
                ):
                    config = WorkerConfig(pool=pool, decoders=1, heartbeat_interval_s=0.05)
                    await nursery.start(Worker(config, "asrd", bus, LoadtestEngine(1)).run)
                    with trio.fail_after(GUARD_S):
                        while not registry.alive(pool):  # noqa: ASYNC110 - the first heartbeat
                            await trio.sleep(0.01)
                    links: list[RemoteRecognizer] = []
                    with trio.fail_after(GUARD_S):
                        async with trio.open_nursery() as sessions:
                            for i in range(sessions_per_round):
                                sessions.start_soon(
                                    claim_as_gateway,
                                    gateway_bus,
                                    links,
                                    outcomes,
                                    registry,
                                    f"race-{r}-{i}",
                                    pool,
                                    i * 0.0002,
                                )
                    for link in links:
                        await link.aclose()
                    nursery.cancel_scope.cancel()
            gateway.cancel_scope.cancel()
    assert outcomes.count("ok") == rounds, outcomes
    assert {o.split()[0] for o in outcomes} == {"ok", str(TooManyRequests.code)}, outcomes


async def claim_as_gateway(
    bus: Bus,
    links: list[RemoteRecognizer],
    outcomes: list[str],
    registry: WorkerRegistry,
    session_id: str,
    pool: str,
    delay_s: float,
) -> None:
    await trio.sleep(delay_s)  # some claims reach the worker as it fills up
    link = RemoteRecognizer(
        bus,
        registry,
        prefix="asrd",
        session_id=session_id,
        task_id="t" * 32,
        pool=pool,
        sample_rate=RATE,
        partials=False,
        claim_timeout_s=2.0,  # a claim answered later counts as lost: not a speed threshold
        failover_timeout_s=5.0,
        journal_max_bytes=1 << 20,
    )
    links.append(link)
    try:
        await link.open()
        outcomes.append("ok")
    except AsrdError as exc:
        outcomes.append(f"{exc.code} {exc.reason}")
