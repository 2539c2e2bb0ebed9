"""Session teardown paths that need a misbehaving peer: fast unit tests with fakes."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest
import trio

from asrd import wire
from asrd.bus import Msg, Subscription
from asrd.bus.memory import InMemoryBus
from asrd.config import Config
from asrd.control import ConnectInfo, StaticControlPlane
from asrd.dialects.alibaba import AlibabaCodec
from asrd.engines import Engine
from asrd.engines.loadtest import LoadtestEngine
from asrd.errors import ClientError, IdleTimeout
from asrd.events import TranscriptionStarted
from asrd.params import SessionParams
from asrd.registry import WorkerRegistry
from asrd.sentences import SentenceTracker
from asrd.session import GatewayState, Session
from asrd.worker import Worker
from tests.audio_fixtures import load_clip, silence


class StuckSocket:
    """A client that never reads: every send blocks forever."""

    def __init__(self) -> None:
        self.sent = 0

    async def send_message(self, message: Any) -> None:
        self.sent += 1
        await trio.sleep_forever()

    async def get_message(self) -> Any:
        await trio.sleep_forever()

    async def aclose(self) -> None:
        pass


def make_session(
    segmentation: dict[str, Any] | None = None, **server: Any
) -> tuple[Session, StuckSocket]:
    config = Config.model_validate({"server": server, "segmentation": segmentation or {}})
    bus = InMemoryBus()
    state = GatewayState(config, bus, WorkerRegistry(bus, "asrd", 1.0), StaticControlPlane(config))
    ws = StuckSocket()
    codec = AlibabaCodec()
    codec.receive_text(
        '{"header":{"message_id":"' + "a" * 32 + '","task_id":"' + "b" * 32 + '",'
        '"namespace":"SpeechTranscriber","name":"StartTranscription","appkey":"k"}}'
    )
    session = Session(state, ws, codec, ConnectInfo("GET", "/ws/v1", {}, None))  # type: ignore[arg-type]
    return session, ws


async def send_until_dropped(session: Session, why: str) -> None:
    """Run the session's send loop until its timeouts end it with ClientError ``why``."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session._send_loop)
        with pytest.raises(ClientError, match=why):
            await session._timeouts_loop()
        nursery.cancel_scope.cancel()


async def test_a_client_that_reads_nothing_is_dropped_after_send_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    session, ws = make_session(send_timeout_s=3.0, idle_timeout_s=60.0)
    session._out_send.send_nowait(TranscriptionStarted("s"))
    start = trio.current_time()
    await send_until_dropped(session, "read no results for 3 s")
    assert ws.sent == 1
    assert trio.current_time() - start == pytest.approx(3.0)


async def test_a_client_that_sends_nothing_is_dropped_after_idle_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The idle timer starts when the receive loop waits, and restarts with every message."""
    session, _ = make_session(idle_timeout_s=5.0)
    session.ws = FastSocket(3, bytes(3200))  # type: ignore[assignment]
    session.params = SessionParams()

    async def audio(data: bytes) -> None:
        await trio.sleep(2.0)  # busy (not waiting) for 2 s per frame: no idle time

    session._audio = audio  # type: ignore[method-assign]
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session._receive_loop)
        with pytest.raises(IdleTimeout, match="nothing received from the client for 5 s"):
            await session._timeouts_loop()
        nursery.cancel_scope.cancel()
    # three frames, each followed by 2 s of work, then 5 s of waiting in vain
    assert trio.current_time() - start == pytest.approx(3 * 2.0 + 5.0)


async def test_results_piling_up_end_the_session_as_a_slow_consumer() -> None:
    """Results the client does not take fill a bounded queue; then the session ends."""
    session, _ = make_session()
    session.tracker = SentenceTracker(SessionParams())
    results = Subscription("asrd.session.s.out", max_pending=2)
    partial = wire.Result(False, 1, 100, "hello", (), 0.0).encode()
    for _ in range(3):  # one more than fits: the bus marks the subscription overflowed
        results.deliver(Msg(results.subject, partial))

    class Remote:
        def __init__(self) -> None:
            self.results = results

        def current(self, result: wire.Result) -> bool:
            return True

    session.remote = Remote()  # type: ignore[assignment]
    with pytest.raises(ClientError, match="too slow a consumer"):
        await session._results_loop()


async def test_a_failure_or_handoff_from_a_void_claim_is_ignored() -> None:
    """A worker whose claim is void (it answered too late, or was failed over) may still say
    "error" or "handoff": only the worker of the current claim is obeyed."""
    from asrd.errors import EngineFailed

    session, _ = make_session()
    session.tracker = SentenceTracker(SessionParams())
    results = Subscription("asrd.session.s.out", max_pending=8)
    for item in (
        wire.Handoff(0),
        wire.Failure(50000000, "stale", 0),
        wire.Failure(50000000, "now", 1),
    ):
        results.deliver(Msg(results.subject, item.encode()))

    class Remote:
        def __init__(self) -> None:
            self.results = results
            self.epoch = 1
            self.handoffs = 0

        def current_epoch(self, item: wire.Failure | wire.Handoff) -> bool:
            return item.epoch == self.epoch

        def handoff_requested(self) -> None:
            self.handoffs += 1

    remote = Remote()
    session.remote = remote  # type: ignore[assignment]
    with pytest.raises(EngineFailed, match="now"):
        await session._results_loop()
    assert remote.handoffs == 0


class FastSocket:
    """A client pushing audio as fast as the gateway reads it."""

    def __init__(self, frames: int, frame: bytes | str) -> None:
        self.left = frames
        self.frame = frame

    async def get_message(self) -> Any:
        if self.left == 0:
            await trio.sleep_forever()
        self.left -= 1
        await trio.lowlevel.checkpoint()
        return self.frame

    async def send_message(self, message: Any) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        pass


async def test_audio_faster_than_allowed_is_slowed_not_refused(
    autojump_clock: trio.abc.Clock,
) -> None:
    """60 s of audio at once, with a 10 s burst and 5x real time: 10 s of (virtual) time."""
    session, _ = make_session(audio_burst_s=10.0, max_audio_speed=5.0, idle_timeout_s=100.0)
    session.ws = FastSocket(600, bytes(3200))  # type: ignore[assignment]  # 100 ms frames
    # (60 s - 10 s burst) / 5x = 10 s; none of the audio was refused
    assert 9.5 <= await read_time(session, frames=600, from_frame=0) <= 10.5


async def read_time(
    session: Session, *, frames: int, from_frame: int, commands: bool = False
) -> float:
    """(Virtual) seconds the session takes to read ``frames`` audio frames (``commands``:
    Control messages), counted from when it has read ``from_frame`` of them (0: from the
    start)."""
    received = 0
    start = trio.current_time()
    done = trio.Event()

    def note() -> None:
        nonlocal received, start
        received += 1
        if received == from_frame:
            start = trio.current_time()
        if received == frames:
            done.set()

    async def audio(data: bytes) -> None:
        note()

    if commands:
        session._control = lambda event: note()  # type: ignore[method-assign]
    else:
        session._audio = audio  # type: ignore[method-assign]
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session._receive_loop)
            await done.wait()
            nursery.cancel_scope.cancel()
    return trio.current_time() - start


class PacedSocket(FastSocket):
    """A client that streams ``paced`` frames at real time, then pushes the rest at once."""

    def __init__(self, paced: int, frames: int, frame: bytes) -> None:
        super().__init__(frames, frame)
        self.paced = paced

    async def get_message(self) -> Any:
        if self.paced:
            self.paced -= 1
            await trio.sleep(0.1)  # 100 ms frames at 1x
        return await super().get_message()


async def test_time_spent_streaming_slowly_earns_no_burst(
    autojump_clock: trio.abc.Clock,
) -> None:
    """100 s at real time, then 60 s of audio at once: only the 10 s burst goes at once, the
    rest at 5x: 10 s. (The allowance used to grow with the session, 5 s of audio per second:
    after 100 s at 1x, 400 s more of audio went in at once.)"""
    session, _ = make_session(audio_burst_s=10.0, max_audio_speed=5.0, idle_timeout_s=100.0)
    session.ws = PacedSocket(1000, 1600, bytes(3200))  # type: ignore[assignment]
    # (60 s - 10 s burst) / 5x = 10 s
    assert 9.5 <= await read_time(session, frames=1600, from_frame=1000) <= 10.5


async def test_a_flood_of_tiny_frames_is_slowed_like_audio(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Each message counts as at least 10 ms of audio: 30,000 2-byte frames (under 2 s of
    audio, well within the burst) count as 300 s, so (300 s - 10 s burst) / 5x = 58 s. They
    used to be read as fast as the client sent them, one session taking a whole core."""
    session, _ = make_session(audio_burst_s=10.0, max_audio_speed=5.0, idle_timeout_s=100.0)
    session.ws = FastSocket(30_000, bytes(2))  # type: ignore[assignment]
    assert 57.5 <= await read_time(session, frames=30_000, from_frame=0) <= 58.5


async def test_a_flood_of_commands_is_slowed_like_audio(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Text messages count against the same allowance, 100 ms each: 600 ControlTranscriber
    messages count as 60 s, so (60 s - 10 s burst) / 5x = 10 s."""
    session, _ = make_session(audio_burst_s=10.0, max_audio_speed=5.0, idle_timeout_s=100.0)
    session.codec.render(TranscriptionStarted("s"))
    control = (
        '{"header":{"message_id":"' + "c" * 32 + '","task_id":"' + "b" * 32 + '",'
        '"namespace":"SpeechTranscriber","name":"ControlTranscriber","appkey":"k"},'
        '"payload":{"max_sentence_silence":500}}'
    )
    session.ws = FastSocket(600, control)  # type: ignore[assignment]
    assert 9.5 <= await read_time(session, frames=600, from_frame=0, commands=True) <= 10.5


def test_a_session_keeps_its_transcript_only_when_it_is_recorded() -> None:
    """A long session must not grow without bound: final sentences are kept for the session
    record only when the control plane records transcripts, and without their words."""
    from asrd.control import Admission
    from asrd.events import SentenceEnd, Word

    end = SentenceEnd(1, 2000, 100, "Hello.", 0.9, (Word("Hello.", 100, 900),), False)
    session, _ = make_session()
    session.admission = Admission("k", "en-US", record_transcript=False)
    session._keep(end)
    assert (session._finals, session._transcript) == (1, [])
    session.admission = Admission("k", "en-US", record_transcript=True)
    session._keep(end)
    assert session._finals == 2
    assert session._transcript == [
        {"index": 1, "begin_time": 100, "time": 2000, "text": "Hello.", "confidence": 0.9}
    ]


async def test_the_transcript_record_holds_the_sentences_the_client_was_sent(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A final sentence counts, and goes into the transcript record, once it is sent: one
    still stuck in the socket when the session ends never reached the client."""
    from asrd.control import Admission
    from asrd.events import SentenceEnd

    session, _ = make_session(send_timeout_s=3.0, idle_timeout_s=60.0)
    session.ws = OneSendSocket()  # type: ignore[assignment]
    session.admission = Admission("k", "en-US", record_transcript=True)
    session.codec.render(TranscriptionStarted("s"))
    for index, text in ((1, "Sent."), (2, "Stuck.")):
        session._out_send.send_nowait(SentenceEnd(index, 2000, 100, text, 0.9, (), False))
    await send_until_dropped(session, "read no results")
    assert session._finals == 1
    assert [s["text"] for s in session._transcript] == ["Sent."]


class OneSendSocket(StuckSocket):
    """A client that reads one message, then nothing more."""

    async def send_message(self, message: Any) -> None:
        self.sent += 1
        if self.sent > 1:
            await trio.sleep_forever()


async def test_a_client_that_stops_reading_at_completion_still_frees_its_slot(
    autojump_clock: trio.abc.Clock,
) -> None:
    """TranscriptionCompleted rendered but stuck in the socket, then the send timeout: the
    session ends with 40000000, sends no TaskFailed after Completed (the protocol's last word),
    and still gives its concurrency slot back."""
    from asrd.control import Admission
    from asrd.events import TranscriptionCompleted

    session, ws = make_session(send_timeout_s=3.0, idle_timeout_s=60.0)
    session.codec.render(TranscriptionStarted("s"))
    session.codec.receive_text(
        '{"header":{"message_id":"' + "c" * 32 + '","task_id":"' + "b" * 32 + '",'
        '"namespace":"SpeechTranscriber","name":"StopTranscription","appkey":"k"}}'
    )
    session._stopping = True
    session.admission = Admission("k", "en-US", record_transcript=False)
    finished: list[int] = []

    async def finish(admission: Admission, record: Any) -> None:
        finished.append(record.code)

    session.state.control.finish = finish  # type: ignore[method-assign]
    session._out_send.send_nowait(TranscriptionCompleted())
    with trio.fail_after(60):
        await session.run()
    assert session.error is not None and session.error.code == 40000000
    assert finished == [40000000]
    assert ws.sent == 1  # TranscriptionCompleted only: no TaskFailed after it
    assert 'code="40000000"' in session.state.metrics.registry.render().decode()


@pytest.mark.parametrize("path", ["/ws/v1", "/nowhere"])
async def test_a_client_gone_before_the_handshake_reply_is_no_server_error(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The client sends its upgrade and hangs up at once: the 101 (or the 404) finds the
    socket closed. That is the client's business, not a traceback in the gateway's log."""
    import logging

    from trio.testing import memory_stream_pair

    from asrd.gateway import Gateway

    config = Config()
    gateway = Gateway(config, InMemoryBus(), StaticControlPlane(config))
    client, server = memory_stream_pair()
    await client.send_all(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "X-NLS-Token: t\r\n\r\n".encode()
    )
    await client.aclose()
    caplog.set_level(logging.WARNING, logger="asrd")
    with trio.fail_after(5):
        await gateway._handle(server)  # type: ignore[arg-type]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_control_changes_reach_the_segmenter() -> None:
    """ControlTranscriber's max_sentence_silence and speech_noise_threshold apply mid-stream."""
    from asrd.events import ControlRequested
    from asrd.segmentation import Segmenter, SegmenterConfig, WebrtcVad

    session, _ = make_session()
    session.params = SessionParams()
    session.segmenter = Segmenter(SegmenterConfig(sample_rate=16000))
    vad = session.segmenter._vad
    assert isinstance(vad, WebrtcVad) and (vad.mode, vad.gate_dbfs) == (2, -47.0)
    session._control(ControlRequested({"speech_noise_threshold": 1.0}))
    assert (vad.mode, vad.gate_dbfs) == (3, -30.0)
    session._control(ControlRequested({"speech_noise_threshold": 7.0}))  # junk: ignored
    assert (vad.mode, vad.gate_dbfs) == (3, -30.0)
    session._control(ControlRequested({"max_sentence_silence_ms": 2000}))
    assert session.segmenter._max_silence == 2000 * 16


async def test_a_session_refused_at_its_start_logs_its_task_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Start whose parameter is refused names the task (its TaskFailed echoes the task id):
    the lines logged about the session carry it as a field under --log-json, as they do once
    a Start is taken."""
    import logging

    from asrd import logs

    session, _ = make_session()
    session.codec = AlibabaCodec()
    session.ws = FastSocket(  # type: ignore[assignment]
        1,
        '{"header":{"message_id":"' + "a" * 32 + '","task_id":"' + "d" * 32 + '",'
        '"namespace":"SpeechTranscriber","name":"StartTranscription","appkey":"k"},'
        '"payload":{"sample_rate":12345}}',
    )
    caplog.handler.setFormatter(logs.JsonFormatter())
    caplog.set_level(logging.INFO, logger="asrd")
    with trio.fail_after(5):
        await session.run()
    assert session.error is not None and session.error.code == 41010101
    lines = [json.loads(line) for line in caplog.text.splitlines()]
    ended = [line for line in lines if " ended: 41010101 " in line["message"]]
    assert ended and ended[0]["session_id"] == session.id, lines
    assert ended[0].get("task_id") == "d" * 32, ended


class ScriptedClient:
    """A client that sends ``script`` (a float: wait that long before the next message), then
    waits; it keeps what it is sent."""

    def __init__(self, script: list[str | bytes | float]) -> None:
        self.script = script
        self.received: list[str] = []

    async def get_message(self) -> Any:
        if not self.script:
            await trio.sleep_forever()
        item = self.script.pop(0)
        if isinstance(item, float):
            await trio.sleep(item)
            item = self.script.pop(0)
        await trio.lowlevel.checkpoint()
        return item

    async def send_message(self, message: Any) -> None:
        self.received.append(message)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        pass


def _command(name: str, message_id: str) -> str:
    """An Alibaba command of the task the session's client runs."""
    header = {"message_id": message_id, "task_id": "d" * 32, "name": name}
    return json.dumps({"header": {**header, "namespace": "SpeechTranscriber"}})


def _frames(pcm: bytes) -> list[str | bytes | float]:
    return [pcm[i : i + 3200] for i in range(0, len(pcm), 3200)]


async def _run_with_a_worker(
    session: Session, script: list[str | bytes | float], engine: Engine | None = None
) -> Worker:
    """Run ``session`` to its end with a client that sends ``script``, served by a real
    worker (of the load-test engine unless given) on the session's in-memory bus; the client
    is ``session.ws``."""
    session.codec = AlibabaCodec()
    session.ws = ScriptedClient(script)  # type: ignore[assignment]
    state = session.state
    worker = Worker(state.config.worker, "asrd", state.bus, engine or LoadtestEngine(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(state.registry.run)
        await nursery.start(worker.run)
        with trio.fail_after(600):
            await session.run()
        nursery.cancel_scope.cancel()
    return worker


async def test_a_sentence_ended_by_stop_is_timed_from_the_stop(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The client stops streaming mid-sentence and sends Stop a minute later: the sentence
    ends when the Stop comes, and asrd_endpointing_seconds measures the gateway from then,
    not from the last audio (it held the client's minute)."""
    session, _ = make_session(idle_timeout_s=120.0)
    speech = load_clip("0880")[: 2 * 16000 * 2]  # 2 s, cut off in the middle of speaking
    script = [
        _command("StartTranscription", "a" * 32),
        *_frames(speech),
        60.0,
        _command("StopTranscription", "c" * 32),
    ]
    await _run_with_a_worker(session, script)
    received = session.ws.received  # type: ignore[attr-defined]
    names = [json.loads(m)["header"]["name"] for m in received]
    assert names[-2:] == ["SentenceEnd", "TranscriptionCompleted"], names
    endpointing = session.state.metrics.endpointing
    assert endpointing.count == 1
    assert endpointing.sum < 5.0, endpointing.sum  # the client's minute is not the gateway's


async def _decoded_ms(trailing_silence_ms: int) -> float:
    """Audio the worker decoded for one sentence ended by 2 s of silence, then Stop."""
    session, _ = make_session({"trailing_silence_ms": trailing_silence_ms}, idle_timeout_s=120.0)
    script = [
        _command("StartTranscription", "a" * 32),
        *_frames(load_clip("0880") + silence(2000, 16000)),
        _command("StopTranscription", "c" * 32),
    ]
    worker = await _run_with_a_worker(session, script)
    received = session.ws.received  # type: ignore[attr-defined]
    assert sum("SentenceEnd" in m for m in received) == 1
    return worker.metrics.audio.values[()] * 1000


async def test_the_engine_gets_the_pause_that_ends_a_sentence_up_to_trailing_silence_ms(
    autojump_clock: trio.abc.Clock,
) -> None:
    """[segmentation] trailing_silence_ms reaches the session's segmenter: of the 810 ms pause
    that ends the sentence, the worker decodes 300 ms, or all of it."""
    whole = await _decoded_ms(6000)
    assert await _decoded_ms(300) == pytest.approx(whole - 510, abs=1)


async def _three_pauses(
    early_final: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[dict[str, Any]], Worker, int]:
    """A sentence with a 300 ms gap inside it, then another, each closed by 2 s of silence,
    served by pocketsphinx with the batch final pass: the SentenceEnd events, the worker,
    and how many pause hints the gateway sent."""
    from asrd.engines.pocketsphinx import PocketsphinxEngine

    session, _ = make_session(idle_timeout_s=120.0)
    hints = 0
    publish = session.state.bus.publish

    def spy(subject: str, data: bytes, reply: str = "") -> None:
        nonlocal hints
        hints += subject.endswith(".in") and b'"type":"pause"' in data.replace(b" ", b"")
        publish(subject, data, reply)

    monkeypatch.setattr(session.state.bus, "publish", spy)
    gap, close = silence(300, 16000), silence(2000, 16000)
    pcm = load_clip("0880") + gap + load_clip("0890") + close + load_clip("0870") + close
    # In real time: a worker with input already waiting skips a pass at a pause.
    paced = [item for frame in _frames(pcm) for item in (0.1, frame)]
    script = [
        _command("StartTranscription", "a" * 32),
        *paced,
        _command("StopTranscription", "c" * 32),
    ]
    engine = PocketsphinxEngine(1, final_pass="batch", early_final=early_final)
    worker = await _run_with_a_worker(session, script, engine)
    received = [json.loads(m) for m in session.ws.received]  # type: ignore[attr-defined]
    ends = [m["payload"] for m in received if m["header"]["name"] == "SentenceEnd"]
    return ends, worker, hints


async def test_a_pause_starts_the_batch_final_pass_within_a_budget_for_passes_thrown_away(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway tells the worker when a pause starts being held; the worker runs the
    batch final pass then. The gap inside the first sentence throws its pass away (speech
    resumed); that used up the session's budget for such passes (EARLY_WASTE_BUDGET), so the
    first sentence's final pass runs at its close. The second sentence comes once the
    session has sent four times as much audio: its final is the pass run at its pause. The
    results are those of passes run at the close."""
    early, worker, hints = await _three_pauses(True, monkeypatch)
    assert hints == 3
    assert worker.metrics.early_finals.values == {("voided",): 1, ("used",): 1}
    at_close, worker, hints = await _three_pauses(False, monkeypatch)
    assert hints == 0  # a worker that did not ask for them gets none
    assert worker.metrics.early_finals.values == {}
    assert len(early) == 2 and all(end["result"] for end in early)
    assert early == at_close


async def test_arrival_times_are_kept_per_step_of_stream_as_nothing_the_collector_tracks(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The latency metrics count from when the audio arrived: the session keeps one arrival
    time per ARRIVAL_STEP_MS of stream. Kept as a tuple each, they made a large part of a
    loaded gateway's young generation, whose collections pause every session
    (docs/benchmarks.md): what they are kept in must hold nothing the cyclic collector
    tracks."""
    session, _ = make_session()
    speech = load_clip("0880")[: 2 * 16000 * 2]
    frames = _frames(speech)
    script: list[str | bytes | float] = [_command("StartTranscription", "a" * 32)]
    for frame in frames:
        script += [frame, 0.1]  # real time: 100 ms frames, 100 ms apart
    script.append(_command("StopTranscription", "c" * 32))
    start = trio.current_time()
    await _run_with_a_worker(session, script)
    kept_ms, kept_at = list(session._arrival_ms), list(session._arrival_at)
    assert len(kept_ms) == len(frames) and kept_ms == sorted(kept_ms), kept_ms
    assert not [
        x for x in gc.get_referents(session._arrival_ms, session._arrival_at) if gc.is_tracked(x)
    ]
    # The audio up to a point arrived with the first frame that took the stream past it.
    for k, ms in enumerate(kept_ms):
        assert kept_at[k] == pytest.approx(start + 0.1 * k, abs=1e-6)
        since = session._since_arrival(ms - 10)
        assert since == pytest.approx(trio.current_time() - kept_at[k], abs=1e-6)
