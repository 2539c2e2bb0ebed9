"""One client session: a nursery of receive, results and send tasks.

The receive task acts on each client message itself, so audio goes from the socket through
the segmenter to the bus without a task switch; a client that sends faster than we process is
slowed down by TCP, since its socket is not read meanwhile. Results reach the send task through
a small bounded memory channel, so a client that reads slower than we produce is failed rather
than buffered without bound. The first error of any task cancels the nursery; the client then
gets the dialect's TaskFailed with that error's code, and nothing escapes into the server.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from asrd import logs, wire
from asrd.audio import WavStreamParser
from asrd.bus import Bus
from asrd.config import Config
from asrd.control import Admission, ConnectInfo, ControlPlane, SessionRecord
from asrd.errors import (
    AsrdError,
    BusError,
    ClientDisconnected,
    ClientError,
    EngineFailed,
    IdleTimeout,
    InvalidMessage,
    ServerError,
    ShuttingDown,
)
from asrd.events import (
    AudioReceived,
    ClientCommand,
    ControlRequested,
    ResultChanged,
    SentenceEnd,
    ServerEvent,
    StartRequested,
    StopRequested,
    TaskFailed,
    TranscriptionCompleted,
    TranscriptionStarted,
)
from asrd.metrics import GatewayMetrics
from asrd.pacing import Pacer
from asrd.params import SessionParams
from asrd.registry import WorkerRegistry
from asrd.remote import RemoteRecognizer
from asrd.segmentation import (
    Segmenter,
    SegmenterConfig,
    SegmentEvent,
    UtteranceAudio,
    UtteranceEnded,
    UtterancePaused,
    UtteranceStarted,
)
from asrd.sentences import SentenceTracker

log = logging.getLogger(__name__)

ARRIVAL_STEP_MS = 50  # resolution of the arrival times kept for the latency metrics
ARRIVALS_KEPT = 300  # 15-30 s of stream (by the frame size): results refer to recent audio
# Every audio frame counts as at least this much audio against ``max_audio_speed``, and every
# command (text message) as COMMAND_S: what a message costs is mostly per message, not per
# byte, so a flood of 1-byte frames or of commands used to take a whole core. At the default
# 10x: at most 1,000 frames or 100 commands a second per session, after the burst.
MIN_FRAME_S = 0.01
COMMAND_S = 0.1


class Codec(Protocol):
    """What a session needs of a dialect codec (see asrd.dialects)."""

    @property
    def task_id(self) -> str: ...

    @property
    def closed(self) -> bool:
        """True once the task's last message (completed or failed) was rendered."""
        ...

    def receive_text(self, text: str) -> ClientCommand: ...

    def receive_binary(self, data: bytes) -> AudioReceived: ...

    def render(self, event: ServerEvent) -> str: ...


@dataclass
class GatewayState:
    """What sessions share: configuration, the bus, the worker registry, auth, counters."""

    config: Config
    bus: Bus
    registry: WorkerRegistry
    control: ControlPlane
    sessions: set[Session] = field(default_factory=set)
    stopped: bool = False  # stop_sessions() was called: a session still starting ends at once
    idle: trio.Event = field(default_factory=trio.Event)  # set whenever no session runs
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)

    @property
    def outcomes(self) -> dict[int, int]:
        """Ended sessions by status code."""
        return {int(k[0]): int(v) for k, v in self.metrics.sessions.values.items()}

    @property
    def active(self) -> int:
        return len(self.sessions)

    def session_started(self, session: Session) -> None:
        self.sessions.add(session)
        if self.idle.is_set():
            self.idle = trio.Event()

    def session_ended(self, session: Session) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self.idle.set()

    def stop_sessions(self) -> None:
        """End every session now (the gateway's shutdown grace is over)."""
        self.stopped = True
        for session in list(self.sessions):
            session.shut_down()


class Session:
    def __init__(
        self, state: GatewayState, ws: WebSocketConnection, codec: Codec, connect: ConnectInfo
    ) -> None:
        self.state = state
        self.config = state.config
        self.ws = ws
        self.codec = codec
        self.connect = connect
        self.admission: Admission | None = None
        self.id = uuid.uuid4().hex
        self._log_context = logs.LogContext(self.id)
        logs.bind(ws, self._log_context)  # for the lines of trio-websocket's reader task
        self.error: AsrdError | None = None
        self.completed = False
        self.params = SessionParams()
        self.remote: RemoteRecognizer | None = None
        self.segmenter: Segmenter | None = None
        self.tracker: SentenceTracker | None = None
        self.wav: WavStreamParser | None = None
        self.audio_bytes = 0
        self._finals = 0  # final sentences sent
        self._transcript: list[dict[str, object]] = []  # for the SessionRecord, if recorded
        self._utt = 0  # index of the latest sentence opened by the segmenter
        # Stream ms processed and arrival time of recent audio frames, for latency metrics:
        # at most one per ARRIVAL_STEP_MS of stream, ARRIVALS_KEPT of them. Two deques, not a
        # tuple per frame: the cyclic collector examines each tuple in the young collection
        # that finds it, and their deaths let that generation grow (docs/benchmarks.md).
        self._arrival_ms: collections.deque[int] = collections.deque(maxlen=ARRIVALS_KEPT)
        self._arrival_at: collections.deque[float] = collections.deque(maxlen=ARRIVALS_KEPT)
        self._stopping = False  # Stop received: no idle timeout any more
        # When the receive loop started waiting for a message / the send loop started
        # sending one; inf while not waiting. _timeouts_loop reads them.
        self._waiting_since = math.inf
        self._sending_since = math.inf
        self._flushed = False  # Stop processed: no sentence will open any more
        # The sentence the Stop closed (0: none) and when: what its endpointing counts from.
        self._closed_by_stop = 0
        self._stopped_at = 0.0
        self._idle = trio.Event()  # set once flushed and every sentence is final
        self._out_send, self._out_recv = trio.open_memory_channel[ServerEvent](64)
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        started = time.monotonic()
        started_at = time.time()
        logs.current.set(self._log_context)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for task in (self._receive_loop, self._send_loop, self._timeouts_loop):
                    nursery.start_soon(self._guard, task)
                if self.state.stopped:
                    self.shut_down()
        finally:
            # The appkey's concurrency slot is given back whatever happens in the teardown.
            with trio.CancelScope(shield=True):
                try:
                    if self.remote is not None:
                        await self.remote.aclose()
                    await self._finish()
                finally:
                    await self._account(started_at, time.monotonic() - started)

    async def _account(self, started_at: float, duration_s: float) -> None:
        """Count the session, record it and give its slot back to the control plane."""
        code = self.error.code if self.error else 20000000
        metrics = self.state.metrics
        metrics.sessions.inc(1, str(code))
        if self.remote is not None and self.remote.failovers:
            metrics.failovers.inc(self.remote.failovers)
        if self.admission is not None:
            await self.state.control.finish(
                self.admission, self._record(started_at, duration_s, code)
            )
        log.info(
            "session %s task %s ended: %s (%s) after %.1f s, %.1f s of audio, %d sentence%s",
            self.id,
            self.codec.task_id or "-",
            code,
            self.error.reason if self.error else "completed",
            duration_s,
            self.audio_bytes / (2 * self.params.sample_rate),
            self._finals,
            "" if self._finals == 1 else "s",
        )

    def _record(self, started_at: float, duration_s: float, code: int) -> SessionRecord:
        assert self.admission is not None
        return SessionRecord(
            task_id=self.codec.task_id,
            session_id=self.id,
            appkey=self.admission.appkey,
            language=self.params.language or "",
            started_at=started_at,
            duration_s=duration_s,
            audio_s=self.audio_bytes / (2 * self.params.sample_rate),
            code=code,
            reason=self.error.reason if self.error else "completed",
            params=self.params.model_dump(mode="json"),
            sentences=self._transcript,
        )

    async def _finish(self) -> None:
        """Tell the client why we stop (unless it hung up, or TranscriptionCompleted, the
        task's last word, is already on its way) and close the socket."""
        err = self.error
        with trio.move_on_after(2):
            if (
                err is not None
                and not isinstance(err, ClientDisconnected)
                and not self.codec.closed
            ):
                try:
                    await self.ws.send_message(self.codec.render(TaskFailed(err.code, err.reason)))
                except ConnectionClosed:
                    pass
            await self.ws.aclose()

    async def _guard(self, task: Callable[[], Awaitable[None]]) -> None:
        try:
            await task()
        except AsrdError as exc:
            self._fail(exc)
        except ConnectionClosed:
            self._fail(ClientDisconnected("client disconnected before the task finished"))
        except Exception:
            log.exception("session %s: internal error", self.id)
            self._fail(ServerError("internal server error"))

    def shut_down(self) -> None:
        """End the session now with :class:`ShuttingDown`: the gateway is stopping."""
        if self._nursery is not None:
            self._fail(ShuttingDown("the server is shutting down; reconnect to another gateway"))

    def _fail(self, exc: AsrdError) -> None:
        if self.error is None and not self.completed:
            self.error = exc
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    # --- tasks ---------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        """Read the client and act on each message right here: audio takes no channel hop
        and no task switch between the socket and the bus (docs/benchmarks.md)."""
        max_frame = self.config.server.max_frame_bytes
        max_text = self.config.server.max_text_bytes
        # Faster than real time is fine up to a burst; beyond it we slow the client down
        # (stop reading its socket) instead of buffering without bound.
        pacer = Pacer(self.config.server.max_audio_speed, self.config.server.audio_burst_s)
        while True:
            self._waiting_since = trio.current_time()  # read by _timeouts_loop
            message = await self.ws.get_message()
            self._waiting_since = math.inf
            if isinstance(message, str):
                if len(message) > max_text:
                    raise InvalidMessage(
                        f"text message of {len(message)} characters exceeds {max_text}"
                    )
                cost_s = COMMAND_S
            else:
                if len(message) > max_frame:
                    raise ClientError(
                        f"audio frame of {len(message)} bytes exceeds the limit of {max_frame}"
                    )
                cost_s = max(MIN_FRAME_S, len(message) / (2 * self.params.sample_rate))
            await pacer.take(cost_s)
            if isinstance(message, str):
                try:
                    command = self.codec.receive_text(message)
                finally:
                    # Known from the first valid header on, also of a message refused (a
                    # Start with an invalid parameter): the lines about the session carry it.
                    self._log_context.task_id = self.codec.task_id
                await self._handle(command)
            else:
                await self._audio(self.codec.receive_binary(message).data)
                if self.remote is not None and self.remote.engine_behind:
                    self.state.metrics.engine_waits.inc()
                    await self.remote.wait_for_engine()  # its socket unread meanwhile

    async def _handle(self, event: ClientCommand) -> None:
        if self._stopping:
            return  # the protocol allows nothing after Stop; the codec refuses what is wrong
        if isinstance(event, StartRequested):
            await self._start(event)
        elif isinstance(event, ControlRequested):
            self._control(event)
        elif isinstance(event, StopRequested):
            self._stopping = True
            await self._stop()

    async def _send_loop(self) -> None:
        metrics = self.state.metrics
        async for event in self._out_recv:
            self._sending_since = trio.current_time()  # read by _timeouts_loop
            await self.ws.send_message(self.codec.render(event))
            self._sending_since = math.inf
            if isinstance(event, ResultChanged):
                metrics.partial_lag.observe(self._since_arrival(event.time_ms))
            elif isinstance(event, SentenceEnd):
                metrics.endpointing.observe(self._since_end(event))
                self._keep(event)  # the record holds what the client was sent
            if isinstance(event, TranscriptionCompleted):
                self.completed = True
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()
                return

    async def _timeouts_loop(self) -> None:
        """End the session when the client sends nothing for ``idle_timeout_s`` (until Stop),
        reads nothing for ``send_timeout_s``, or the session outlives ``max_session_s``. One
        timer per session instead of a cancel scope per message: the receive and send loops
        only note when they started waiting."""
        idle_s = self.config.server.idle_timeout_s
        send_s = self.config.server.send_timeout_s
        max_s = self.config.server.max_session_s
        end_at = trio.current_time() + max_s
        while True:
            now = trio.current_time()
            idle_at = math.inf if self._stopping else self._waiting_since + idle_s
            stuck_at = self._sending_since + send_s
            if now >= stuck_at:
                raise ClientError(f"the client read no results for {send_s:g} s")
            if now >= idle_at:
                raise IdleTimeout(f"nothing received from the client for {idle_s:g} s")
            if now >= end_at:
                raise ClientError(f"session exceeded the maximum duration of {max_s:g} s")
            # A wait that starts after this check ends no earlier than ``now`` + its timeout.
            await trio.sleep_until(min(idle_at, stuck_at, end_at, now + min(idle_s, send_s)))

    async def _results_loop(self) -> None:
        assert self.remote is not None and self.remote.results is not None
        assert self.tracker is not None
        while True:
            try:
                msg = await self.remote.results.receive()
            except BusError:
                raise ClientError(
                    "results are not being read: the client is too slow a consumer"
                ) from None
            item = wire.decode_output(msg.data)
            if isinstance(item, wire.Progress):
                self.remote.progressed(item)
                continue
            if isinstance(item, wire.Handoff | wire.Failure):
                if not self.remote.current_epoch(item):
                    continue  # from a worker whose claim is void: not ours to obey
                if isinstance(item, wire.Handoff):
                    self.remote.handoff_requested()
                    continue
                raise EngineFailed(item.reason, code=item.code)
            if not self.remote.current(item):
                continue  # from before a failover or reconnect: the replay will redo it
            for ev in self.tracker.result(item):
                await self._out_send.send(ev)
            if item.final:
                self.remote.finalized(item.utt, item.state)
            if self._flushed and self.tracker.idle:
                self._idle.set()

    def _keep(self, end: SentenceEnd) -> None:
        """Count a final sentence, and keep what the transcript record needs of it (not its
        words) only when the control plane records transcripts: memory stays flat in a
        session of any length otherwise."""
        self._finals += 1
        if self.admission is not None and self.admission.record_transcript:
            self._transcript.append(
                {
                    "index": end.index,
                    "begin_time": end.begin_time_ms,
                    "time": end.time_ms,
                    "text": end.text,
                    "confidence": end.confidence,
                }
            )

    # --- steps ---------------------------------------------------------------------------

    async def _start(self, event: StartRequested) -> None:
        params = event.params
        self.admission = await self.state.control.admit(
            self.connect, appkey=event.appkey, language=params.language, session_id=self.id
        )
        if params.language is None:  # as routed: [routing] default_language first
            language = self.admission.language or self.config.server.default_language
            params = params.model_copy(update={"language": language})
        self.params = params
        seg = self.config.segmentation
        self.segmenter = Segmenter(
            SegmenterConfig(
                sample_rate=params.sample_rate,
                max_sentence_silence_ms=params.max_sentence_silence_ms,
                speech_noise_threshold=params.speech_noise_threshold,
                max_sentence_ms=seg.max_sentence_ms,
                ignore_sentence_timeout=params.enable_ignore_sentence_timeout,
                frame_ms=seg.frame_ms,
                preroll_ms=seg.preroll_ms,
                trailing_silence_ms=seg.trailing_silence_ms,
                pause_hint_ms=seg.pause_hint_ms,
            )
        )
        self.tracker = SentenceTracker(params)
        if params.format == "wav":
            self.wav = WavStreamParser(params.sample_rate)
        self.remote = RemoteRecognizer(
            self.state.bus,
            self.state.registry,
            prefix=self.config.nats.subject_prefix,
            session_id=self.id,
            task_id=self.codec.task_id,
            pool=self.admission.pool,
            sample_rate=params.sample_rate,
            partials=params.enable_intermediate_result,
            claim_timeout_s=self.config.server.claim_timeout_s,
            failover_timeout_s=self.config.server.failover_timeout_s,
            journal_max_bytes=self.config.server.journal_max_bytes,
        )
        await self.remote.open()
        assert self._nursery is not None
        self._nursery.start_soon(self._guard, self._results_loop)
        self._nursery.start_soon(self._guard, self.remote.watch_loop)
        await self._out_send.send(TranscriptionStarted(self.id))

    async def _audio(self, data: bytes) -> None:
        assert self.segmenter is not None
        if self.wav is not None:
            data = self.wav.feed(data)
        self.audio_bytes += len(data)
        self.state.metrics.audio.inc(len(data) / (2 * self.params.sample_rate))
        events = self.segmenter.feed(data)
        processed_ms = self.segmenter.processed_ms
        arrival_ms = self._arrival_ms
        if not arrival_ms or processed_ms - arrival_ms[-1] >= ARRIVAL_STEP_MS:
            arrival_ms.append(processed_ms)
            self._arrival_at.append(trio.current_time())
        if events:
            await self._segment(events)

    def _since_arrival(self, stream_ms: int) -> float:
        """Seconds since the audio up to ``stream_ms`` arrived: the first arrival kept at or
        after it (the oldest kept, once it is forgotten; the newest, if not there yet), or 0
        with none kept."""
        arrival_ms = self._arrival_ms
        if not arrival_ms:
            return 0.0
        i = min(bisect.bisect_left(arrival_ms, stream_ms), len(arrival_ms) - 1)
        return max(0.0, trio.current_time() - self._arrival_at[i])

    def _since_end(self, end: SentenceEnd) -> float:
        """Seconds since the sentence was closed: by the audio that closed it, or by the Stop
        (the client may send it long after its last audio, and that wait is not ours)."""
        if end.index == self._closed_by_stop:
            return max(0.0, trio.current_time() - self._stopped_at)
        return self._since_arrival(end.time_ms)

    async def _segment(self, events: list[SegmentEvent]) -> None:
        remote, tracker = self.remote, self.tracker
        assert remote is not None and tracker is not None
        for ev in events:
            if isinstance(ev, UtteranceAudio):
                remote.audio(self._utt, ev.pcm)
            elif isinstance(ev, UtterancePaused):
                remote.pause(self._utt)
            elif isinstance(ev, UtteranceStarted):
                self._utt += 1
                remote.begin(self._utt)
                for out in tracker.begin(self._utt, ev.begin_ms, ev.audio_start_ms):
                    await self._out_send.send(out)
            else:
                tracker.end(self._utt, ev.end_ms, ev.timed_out)
                remote.end(self._utt)

    def _control(self, event: ControlRequested) -> None:
        changes = {k: v for k, v in event.changes.items() if k in SessionParams.model_fields}
        try:
            self.params = SessionParams.model_validate({**self.params.model_dump(), **changes})
        except ValueError:
            return  # the protocol says: tolerate junk, no reply
        if self.tracker is not None:
            self.tracker.params = self.params
        if self.segmenter is not None and "max_sentence_silence_ms" in changes:
            self.segmenter.set_max_sentence_silence(self.params.max_sentence_silence_ms)
        threshold = self.params.speech_noise_threshold
        if (
            self.segmenter is not None
            and "speech_noise_threshold" in changes
            and threshold is not None
        ):
            self.segmenter.set_speech_noise_threshold(threshold)

    async def _stop(self) -> None:
        """Flush the segmenter, then complete once every sentence is final. The wait runs
        as its own task, so the client's socket is still read (a hang-up is noticed)."""
        assert self.segmenter is not None and self.tracker is not None
        events = self.segmenter.flush()
        if any(isinstance(ev, UtteranceEnded) for ev in events):
            self._closed_by_stop, self._stopped_at = self._utt, trio.current_time()
        await self._segment(events)
        self._flushed = True
        assert self._nursery is not None
        self._nursery.start_soon(self._guard, self._complete)

    async def _complete(self) -> None:
        assert self.tracker is not None
        if not self.tracker.idle:
            await self._idle.wait()
        await self._out_send.send(TranscriptionCompleted())
