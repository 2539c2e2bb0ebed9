"""The load generator: many concurrent Alibaba-dialect sessions from one trio process.

One task per session. Audio frames are sliced once per playlist and shared by every session
that streams it; each frame leaves when its last sample would have been captured live
(``speed`` times faster when asked), with deadlines computed from one start time per
session, so delays never accumulate. Every timestamp is ``time.monotonic()``, which on Linux
is one clock for every process on the machine, so shards in separate processes can share a
schedule.

Before each run the load generator tunes its garbage collector as the services do
(:func:`asrd.gctune.tune`): a full collection of its hundreds of sessions paused every one of
them at once, and each result received meanwhile was measured late by that pause.

For each session the load generator keeps only what the report needs: the partial lags and
when each partial came (the report shows when in the run the late ones were), the endpointing
latencies, the sentence texts per recording, and how late its own sends
were (a late client means the measurement, not the server, is the bottleneck).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import trio
import trio_websocket

from asrd import gctune
from asrd.bench.corpus import Corpus, Playlist, load_corpus
from asrd.bench.stats import FrameClock, endpoint_latency_s
from asrd.client import start_message, stop_message

__all__ = [
    "COMPLETED",
    "LoadPlan",
    "SessionResult",
    "SessionSpec",
    "run_load",
    "run_session",
]

COMPLETED = "completed"
LATE_S = 0.020  # a send this much behind its schedule counts as late
OK_STATUS = 20000000


@dataclass(frozen=True, slots=True)
class SessionSpec:
    index: int
    start_at: float  # time.monotonic() at which to connect
    first_clip: int  # playlist starts at this recording


@dataclass(frozen=True)
class LoadPlan:
    """Everything a load generator (or a shard of one in another process) needs."""

    url: str
    sessions: tuple[SessionSpec, ...]
    data_dir: str
    duration_s: float  # minimum audio per session (whole recordings)
    frame_ms: int = 100
    speed: float = 1.0
    gap_ms: int = 1500  # silence after each recording
    max_sentence_silence_ms: int = 800
    sample_rate: int = 16000
    token: str | None = None
    appkey: str = "default"
    params: dict[str, Any] = field(default_factory=dict)  # extra StartTranscription keys
    reply_timeout_s: float = 30.0

    def start_params(self) -> dict[str, Any]:
        return {
            "enable_intermediate_result": True,
            "enable_words": True,
            "max_sentence_silence": self.max_sentence_silence_ms,
            **self.params,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoadPlan:
        obj = json.loads(text)
        obj["sessions"] = tuple(SessionSpec(**s) for s in obj["sessions"])
        return cls(**obj)


@dataclass
class SessionResult:
    index: int
    outcome: str = COMPLETED  # "completed", a TaskFailed status code, or a local failure
    reason: str = ""
    start_s: float | None = None  # connect -> TranscriptionStarted
    audio_s: float = 0.0  # audio sent
    started_at: float | None = None  # time.monotonic() of its scheduled start
    partial_lags: list[float] = field(default_factory=list)  # seconds
    partial_received: list[float] = field(default_factory=list)  # time.monotonic() of each
    endpoint: list[float] = field(default_factory=list)  # seconds, from the last word's end
    endpoint_vad: list[float] = field(default_factory=list)  # seconds, from the VAD's end
    sentences: int = 0
    flushed: int = 0  # sentences ended by StopTranscription, not by silence
    timed_out: int = 0  # sentences force-closed (51040104)
    unmapped: int = 0  # results naming audio we had not sent (should stay 0)
    hyps: list[str] = field(default_factory=list)  # per playlist recording
    refs: list[str] = field(default_factory=list)
    late_max_s: float = 0.0  # worst lateness of a send against its schedule
    late_sends: int = 0  # sends more than LATE_S late
    sends: int = 0

    @property
    def completed(self) -> bool:
        return self.outcome == COMPLETED

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("partial_lags", "partial_received", "endpoint", "endpoint_vad"):
            d[key] = [round(v, 6) for v in d[key]]
        return d

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> SessionResult:
        return cls(**obj)


class _Failed(Exception):
    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


async def run_session(plan: LoadPlan, spec: SessionSpec, playlist: Playlist) -> SessionResult:
    """Run one session to its end; never raises (failures are in the result)."""
    result = SessionResult(spec.index, started_at=spec.start_at, refs=playlist.references())
    result.hyps = ["" for _ in playlist.items]
    offset = trio.current_time() - time.monotonic()
    await trio.sleep_until(spec.start_at + offset)
    # A hang guard for the whole session, far beyond anything a healthy server needs.
    guard_s = playlist.duration_s / plan.speed + 4 * plan.reply_timeout_s + 10
    with trio.move_on_after(guard_s) as guard:
        try:
            await _session(plan, playlist, result)
        except _Failed as exc:
            result.outcome, result.reason = exc.outcome, exc.reason
        except trio_websocket.ConnectionRejected as exc:
            result.outcome, result.reason = "rejected", f"HTTP {exc.status_code}"
        except trio_websocket.HandshakeError as exc:
            result.outcome, result.reason = "connect", str(exc.__cause__ or exc)
        except trio_websocket.ConnectionClosed as exc:
            result.outcome, result.reason = "closed", str(exc.reason)
        except OSError as exc:
            result.outcome, result.reason = "connect", str(exc)
    if guard.cancelled_caught:
        result.outcome, result.reason = "timeout", f"session still running after {guard_s:.0f} s"
    return result


async def _session(plan: LoadPlan, playlist: Playlist, result: SessionResult) -> None:
    headers = [(b"X-NLS-Token", plan.token.encode())] if plan.token else []
    task_id = uuid.uuid4().hex
    t_connect = time.monotonic()
    async with trio_websocket.open_websocket_url(
        plan.url,
        extra_headers=headers,
        connect_timeout=plan.reply_timeout_s,
        disconnect_timeout=plan.reply_timeout_s,
        message_queue_size=16,
    ) as ws:
        start = start_message(task_id, plan.appkey, plan.sample_rate, plan.start_params())
        await ws.send_message(json.dumps(start))
        with trio.move_on_after(plan.reply_timeout_s):
            first = _parse(await ws.get_message())
            name = first["header"]["name"]
            if name == "TaskFailed":
                raise _task_failed(first)
            if name != "TranscriptionStarted":
                raise _Failed("protocol", f"expected TranscriptionStarted, got {name}")
            result.start_s = time.monotonic() - t_connect
        if result.start_s is None:
            raise _Failed("timeout", "no TranscriptionStarted")
        clock = FrameClock(playlist.frame_samples, playlist.sample_rate)
        stream = _Stream(plan, playlist, clock, result)
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_loop, ws, task_id)
            try:
                await stream.receive_loop(ws)
            except (_Failed, trio_websocket.ConnectionClosed) as exc:
                failure = exc  # raised below, outside the nursery (no exception group)
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure


class _Stream:
    """The sending and receiving halves of one running session."""

    def __init__(
        self, plan: LoadPlan, playlist: Playlist, clock: FrameClock, result: SessionResult
    ) -> None:
        self.plan = plan
        self.playlist = playlist
        self.clock = clock
        self.result = result
        self.stop_sent = False
        self.receive_scope: trio.CancelScope | None = None
        # A sentence whose end is this close to the end of the stream was ended by the flush.
        self.flush_ms = playlist.duration_ms - 30

    async def send_loop(self, ws: trio_websocket.WebSocketConnection, task_id: str) -> None:
        plan, clock, result = self.plan, self.clock, self.result
        speed = plan.speed
        t0 = time.monotonic()
        offset = trio.current_time() - t0
        late_max = 0.0
        late = 0
        sent = 0
        try:
            for k, frame in enumerate(self.playlist.frames):
                due = t0 + clock.frame_end_s(k) / speed
                await trio.sleep_until(due + offset)
                now = time.monotonic()
                behind = now - due
                if behind > late_max:
                    late_max = behind
                if behind > LATE_S:
                    late += 1
                clock.sent(k, now)
                await ws.send_message(frame)
                sent += 1
                result.audio_s += len(frame) / 2 / self.playlist.sample_rate
            await ws.send_message(json.dumps(stop_message(task_id, plan.appkey)))
        except trio_websocket.ConnectionClosed:
            return  # the receiving side reports why
        finally:
            # The frames sent, not the playlist's: a session that ended early sent fewer.
            result.late_max_s, result.late_sends, result.sends = late_max, late, sent
        self.stop_sent = True
        if self.receive_scope is not None:
            self.receive_scope.deadline = trio.current_time() + plan.reply_timeout_s

    async def receive_loop(self, ws: trio_websocket.WebSocketConnection) -> None:
        with trio.CancelScope() as scope:
            self.receive_scope = scope
            while True:
                message = await ws.get_message()
                received = time.monotonic()
                event = _parse(message)
                if self._on_event(event, received):
                    return
        raise _Failed("timeout", "no TranscriptionCompleted after StopTranscription")

    def _on_event(self, event: dict[str, Any], received: float) -> bool:
        """Record one server event; True when the session is over."""
        name = event["header"]["name"]
        payload = event.get("payload") or {}
        result = self.result
        if name == "TranscriptionResultChanged":
            sent = self.clock.sent_at(int(payload["time"]))
            if sent is None:
                result.unmapped += 1
            else:
                result.partial_lags.append(received - sent)
                result.partial_received.append(received)
        elif name == "SentenceEnd":
            self._sentence_end(payload, received)
        elif name == "TranscriptionCompleted":
            return True
        elif name == "TaskFailed":
            raise _task_failed(event)
        return False

    def _sentence_end(self, payload: dict[str, Any], received: float) -> None:
        result, plan = self.result, self.plan
        result.sentences += 1
        end_ms = int(payload["time"])
        text = str(payload.get("result") or "")
        if text:
            k = self.playlist.item_at(int(payload.get("begin_time", end_ms)))
            result.hyps[k] = f"{result.hyps[k]} {text}".strip()
        if payload.get("status", OK_STATUS) != OK_STATUS:
            result.timed_out += 1
            return
        if end_ms >= self.flush_ms:
            result.flushed += 1
            return
        silence = plan.max_sentence_silence_ms
        decided = self.clock.sent_at(end_ms)
        words = payload.get("words") or []
        speech_end = int(words[-1]["endTime"]) if words else end_ms - silence
        spoken = self.clock.sent_at(speech_end)
        if decided is None or spoken is None:
            result.unmapped += 1
            return
        result.endpoint.append(endpoint_latency_s(received, spoken, silence, plan.speed))
        result.endpoint_vad.append(received - decided)


def _parse(message: str | bytes) -> dict[str, Any]:
    if isinstance(message, bytes):
        raise _Failed("protocol", "server sent a binary message")
    try:
        event = json.loads(message)
        name = event["header"]["name"]
    except (ValueError, KeyError, TypeError):
        raise _Failed("protocol", f"unparsable server message {message[:120]!r}") from None
    if not isinstance(name, str):
        raise _Failed("protocol", "header.name is not a string")
    return dict(event)


def _task_failed(event: dict[str, Any]) -> _Failed:
    header = event["header"]
    return _Failed(str(header.get("status", "TaskFailed")), str(header.get("status_text", "")))


def playlists_for(plan: LoadPlan, corpus: Corpus) -> dict[int, Playlist]:
    firsts = {s.first_clip % len(corpus.clips) for s in plan.sessions}
    return {
        f: Playlist.build(
            corpus,
            first=f,
            min_duration_s=plan.duration_s,
            gap_ms=plan.gap_ms,
            frame_ms=plan.frame_ms,
        )
        for f in firsts
    }


async def run_load(plan: LoadPlan, corpus: Corpus | None = None) -> list[SessionResult]:
    """Run every session of ``plan`` (each from its own start time) and return the results."""
    if corpus is None:
        corpus = load_corpus(plan.data_dir, plan.sample_rate)
    playlists = playlists_for(plan, corpus)
    for p in playlists.values():
        _ = p.frames, p.frame_samples  # slice before the clock starts
    gctune.tune()  # before the clock starts too: no collection pauses every session
    results: list[SessionResult] = []

    async def one(spec: SessionSpec) -> None:
        playlist = playlists[spec.first_clip % len(corpus.clips)]
        results.append(await run_session(plan, spec, playlist))

    async with trio.open_nursery() as nursery:
        for spec in plan.sessions:
            nursery.start_soon(one, spec)
    results.sort(key=lambda r: r.index)
    return results


def schedule(
    n: int, *, start_at: float, ramp_s: float, first_index: int = 0
) -> tuple[SessionSpec, ...]:
    """``n`` sessions whose starts are spread evenly over ``ramp_s`` from ``start_at``."""
    step = ramp_s / n if n > 0 else 0.0
    return tuple(
        SessionSpec(first_index + i, start_at + i * step, first_index + i) for i in range(n)
    )


def split(sessions: tuple[SessionSpec, ...], parts: int) -> list[tuple[SessionSpec, ...]]:
    """Round-robin split (every part gets starts across the whole ramp)."""
    parts = max(1, min(parts, len(sessions))) if sessions else 1
    return [sessions[k::parts] for k in range(parts)]
