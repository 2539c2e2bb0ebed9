"""The engine worker: serves sessions claimed over the bus with a preloaded decoder pool.

A worker listens for claims of its pool in a NATS queue group only while it has a free
decoder, so a full worker is never picked: when every worker is full the gateway's claim gets
"no responders" at once, and the client 40000005 within half a second. A claimed session is
bound to one decoder until the gateway closes it or goes silent (``session_idle_timeout_s``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from asrd import logs, wire
from asrd.bus import Bus, Subscription, claim_subject, heartbeat_subject, session_in, session_out
from asrd.config import WorkerConfig
from asrd.engines.base import Engine, Hypothesis, Recognizer
from asrd.errors import AsrdError, BusError, ServerError, TooManyRequests
from asrd.metrics import WorkerMetrics

log = logging.getLogger(__name__)

CLAIM_QUEUE = "asrd-workers"
CLAIM_BACKLOG = 1024  # claims received but not yet answered; a burst beyond it overflows
MAX_STEP_MS = 100  # audio decoded between two checkpoints of the worker's event loop
# A partial is put off while more of the session's audio already waits, by at most this much
# audio: made before that audio is decoded, it would be stale when it arrives.
MAX_PARTIAL_DEFER_MS = 1000
STALL_S = 5.0  # heartbeats stop when the event loop has made no progress for this long
# A session's input messages between two progress reports. Its gateway stops sending audio
# while more than asrd.remote.ENGINE_WINDOW of them are unacknowledged: a client that sends
# faster than its decoder keeps up is slowed to the decoder's pace, and the session's input
# never holds more than a window (its subscription, below, overflows at 4096).
PROGRESS_EVERY = 64
# Final passes run at a pause and thrown away (speech resumed) may decode at most this share
# of a session's audio again: their cost stays under a quarter of the final passes' own.
EARLY_WASTE_BUDGET = 0.25


class EarlyFinals:
    """When one session's final pass may run at a pause (:meth:`Recognizer.pause`), and what
    became of the one that did. Each pause that speech resumes after throws a decode of the
    utterance so far away, so a session may run one while its passes thrown away have
    decoded at most ``EARLY_WASTE_BUDGET`` times the audio it sent (the first always may).
    Sizes in bytes of audio."""

    __slots__ = ("_ran", "audio", "voided")

    def __init__(self) -> None:
        self.audio = 0  # the session's audio decoded
        self.voided = 0  # audio decoded by passes thrown away
        self._ran = -1  # the audio of the pass run at the utterance's current pause, if any

    def allowed(self) -> bool:
        return self.voided <= EARLY_WASTE_BUDGET * self.audio

    def ran(self, utterance: int) -> None:
        self._ran = utterance

    def heard(self, audio: int) -> bool:
        """More audio of the utterance; True if it threw a pass away."""
        self.audio += audio
        if self._ran < 0:
            return False
        self.voided += self._ran
        self._ran = -1
        return True

    def ended(self) -> bool:
        """The utterance ended (or restarted); True if its pass ran at its last pause."""
        ran = self._ran >= 0
        self._ran = -1
        return ran


class _Served:
    """A session this worker decodes: the claim it serves, its cancel scope, its input,
    whether an utterance is open, and when its gateway last sent anything."""

    __slots__ = ("claim", "done", "in_utterance", "inbox", "last_heard", "scope", "silent")

    def __init__(self, claim: wire.Claim, inbox: Subscription) -> None:
        self.claim = claim
        self.scope = trio.CancelScope()
        self.inbox = inbox
        self.in_utterance = False
        self.done = trio.Event()
        self.last_heard = trio.current_time()
        self.silent = False  # freed by _silence_loop


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        prefix: str,
        bus: Bus,
        engine: Engine,
        gate: contextlib.AbstractContextManager[None] | None = None,
    ) -> None:
        self.config = config
        self.prefix = prefix
        self.bus = bus
        self.engine = engine
        # Held around engine work: a slot among the forked processes (asrd.cpugate).
        self.gate = gate if gate is not None else contextlib.nullcontext()
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.sessions: dict[str, _Served] = {}
        self.draining = False
        self._pause_until = 0.0  # time.monotonic() until which heartbeats may stop
        self._pauses = 0  # announced final passes not yet over
        self._progress = time.monotonic()  # when the event loop last showed it is running
        self._stop_beats: Callable[[], None] | None = None  # the periodic heartbeats
        m = self.metrics = WorkerMetrics()
        m.sessions.fn = lambda: len(self.sessions)
        m.decoders_free.fn = lambda: max(self.free, 0)
        m.decoders_total.fn = lambda: self.engine.capacity
        m.nats_reconnects.fn = lambda: bus.reconnects
        m.nats_errors.fn = lambda: getattr(bus, "errors", 0)
        self._claim_sub: Subscription | None = None
        self._claim_lock = trio.Lock()
        self._claiming = trio.Lock()
        self._nursery: trio.Nursery | None = None

    @property
    def free(self) -> int:
        return self.engine.capacity - len(self.sessions)

    async def run(self, *, task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._heartbeat_loop)
            nursery.start_soon(self._silence_loop)
            await self._update_claim_subscription()
            await self.bus.flush()
            log.info(
                "worker %s serving pool %r with %d %s decoders",
                self.id,
                self.config.pool,
                self.engine.capacity,
                self.engine.name,
            )
            task_status.started(self)
            await trio.sleep_forever()

    async def drain(self) -> None:
        """Stop taking sessions and hand the running ones back to their gateways.

        A session between utterances is handed back at once; one in an utterance after that
        utterance's final result. The gateway moves it to another worker with nothing lost.
        """
        self.draining = True
        await self._update_claim_subscription()
        self._beat()
        for served in list(self.sessions.values()):
            if not served.in_utterance:
                served.scope.cancel()
        while self.sessions:  # noqa: ASYNC110 - shutdown only; sessions end on their own
            await trio.sleep(0.05)

    async def leave(self) -> None:
        """Say goodbye: the heartbeats stop, after a last one saying so, so that gateways forget
        this worker at once instead of declaring it dead (a warning) a timeout later. After
        :meth:`drain`; a session still running moves at once."""
        if self._stop_beats is not None:
            self._stop_beats()
            self._stop_beats = None
        last = wire.Heartbeat(
            self.id, self.config.pool, self.engine.name, self.engine.capacity, 0, True, 0.0, True
        )
        try:
            self.bus.publish(heartbeat_subject(self.prefix), last.encode())
            await self.bus.flush()
        except BusError as exc:  # the gateways will declare it dead instead
            log.warning("last heartbeat not sent: %s", exc)

    async def set_pool(self, pool: str) -> None:
        """Serve claims of ``pool`` from now on (live routing); running sessions continue."""
        if pool == self.config.pool:
            return
        log.info("worker %s moves from pool %r to %r", self.id, self.config.pool, pool)
        self.config = self.config.model_copy(update={"pool": pool})
        async with self._claim_lock:
            if self._claim_sub is not None:
                sub, self._claim_sub = self._claim_sub, None
                await self.bus.unsubscribe(sub, drain=True)
        await self._update_claim_subscription()
        self._beat()

    # --- claims ----------------------------------------------------------------------------

    async def _update_claim_subscription(self) -> None:
        # One change at a time: two sessions ending together must not both subscribe (the
        # second subscription would be orphaned, and claims would reach us when full).
        async with self._claim_lock:
            want = self.free > 0 and not self.draining
            if want and self._claim_sub is None:
                subject = claim_subject(self.prefix, self.config.pool)
                self._claim_sub = await self.bus.subscribe(
                    subject, queue=CLAIM_QUEUE, max_pending=CLAIM_BACKLOG
                )
                assert self._nursery is not None
                self._nursery.start_soon(self._claim_loop, self._claim_sub)
            elif not want and self._claim_sub is not None:
                # Drained: claims already on their way to us are answered "busy" by the claim
                # loop (the gateway tries again), not dropped. The server can still route one
                # to us after the drain; the gateway sends a claim nobody answers again.
                sub, self._claim_sub = self._claim_sub, None
                await self.bus.unsubscribe(sub, drain=True)

    async def _claim_loop(self, sub: Subscription) -> None:
        while True:
            try:
                msg = await sub.receive()
            except BusError as exc:
                async with self._claim_lock:
                    overflowed = sub is self._claim_sub  # else we unsubscribed it ourselves
                    if overflowed:
                        self._claim_sub = None
                        await self.bus.unsubscribe(sub)
                if overflowed:  # a burst overflowed it: subscribe afresh
                    log.warning("claims of pool %r: %s", self.config.pool, exc)
                    await self._update_claim_subscription()
                return  # else unsubscribed because we are full, draining or moved
            try:
                claim = wire.decode_claim(msg.data)
            except BusError as exc:
                log.warning("ignoring malformed claim: %s", exc)
                continue
            # One claim at a time, even while a drained claim subscription is still read
            # beside the next one: two claims of one session must not both get a decoder.
            async with self._claiming:
                reply = await self._claim(claim)
            if msg.reply:
                try:
                    self.bus.publish(msg.reply, reply.encode())
                except BusError as exc:  # the gateway claims again when no answer comes
                    with logs.about(claim.session_id, claim.task_id):
                        log.warning("claim of session %s not answered: %s", claim.session_id, exc)

    async def _claim(self, claim: wire.Claim) -> wire.ClaimReply:
        old = self.sessions.get(claim.session_id)
        if old is not None and claim.epoch < old.claim.epoch:
            # Sent before the claim we serve, read after it: its gateway waited in vain and
            # claimed again, and the newer claim came through our next claim subscription while
            # this one still waited in the drained one. Void: restarted under it, the session's
            # results would be dropped by the gateway, and the next keepalive would end it with
            # nobody decoding it. Nobody waits for this answer.
            self.metrics.claims.inc(1, "void")
            return wire.ClaimReply(
                False, self.id, ServerError.code, f"void: epoch {old.claim.epoch} is served"
            )
        if old is not None:
            # The gateway moved the session (it thought us dead, or the bus reconnected) and
            # will replay its journal: start it afresh rather than decode it twice.
            old.scope.cancel()
            await old.done.wait()
        if self.draining:
            self.metrics.claims.inc(1, "draining")
            return wire.ClaimReply(False, self.id, TooManyRequests.code, "worker is draining")
        try:
            recognizer = self.engine.acquire(
                claim.sample_rate, partials=claim.partials, state=claim.state
            )
        except AsrdError as exc:
            self.metrics.claims.inc(1, "refused")
            return wire.ClaimReply(False, self.id, exc.code, exc.reason)
        except Exception as exc:  # an engine bug: refuse this claim, not end the worker
            with logs.about(claim.session_id, claim.task_id):
                log.exception("claim of session %s: engine error", claim.session_id)
            self.metrics.claims.inc(1, "refused")
            return wire.ClaimReply(False, self.id, ServerError.code, f"engine error: {exc!r}")
        try:
            sub = await self.bus.subscribe(
                session_in(self.prefix, claim.session_id), max_pending=4096
            )
        except BusError as exc:
            self.engine.release(recognizer)
            self.metrics.claims.inc(1, "refused")
            return wire.ClaimReply(False, self.id, exc.code, f"cannot take it: {exc.reason}")
        if self.draining:  # drain() began while we subscribed: it would not see this session
            self.engine.release(recognizer)
            with trio.CancelScope(shield=True):
                await self.bus.unsubscribe(sub)
            self.metrics.claims.inc(1, "draining")
            return wire.ClaimReply(False, self.id, TooManyRequests.code, "worker is draining")
        self.metrics.claims.inc(1, "accepted")
        served = _Served(claim, sub)
        self.sessions[claim.session_id] = served
        assert self._nursery is not None
        self._nursery.start_soon(self._session, recognizer, served)
        await self._update_claim_subscription()
        # Progress reports only to a gateway that asked for them (see _session).
        return wire.ClaimReply(
            True,
            self.id,
            progress=PROGRESS_EVERY if claim.progress else 0,
            pauses=self.engine.early_final,
        )

    # --- sessions ----------------------------------------------------------------------------

    async def _session(self, rec: Recognizer, served: _Served) -> None:
        claim = served.claim
        logs.current.set(logs.LogContext(claim.session_id, claim.task_id))  # this task's lines
        sub = served.inbox
        out = session_out(self.prefix, claim.session_id)
        step = claim.sample_rate * 2 * self.config.partial_interval_ms // 1000
        utt = 0  # 0: no utterance open
        audio_bytes = 0
        next_partial = step
        last_partial = ""
        bytes_per_ms = claim.sample_rate * 2 // 1000
        bytes_per_s = claim.sample_rate * 2
        step_bytes = bytes_per_ms * MAX_STEP_MS
        defer_bytes = bytes_per_ms * MAX_PARTIAL_DEFER_MS
        # Our own link to NATS dropping loses what the gateway sent meanwhile, and its gateway
        # does not know: hand the session back, so that it replays its journal.
        reconnects = self.bus.reconnects
        handback = False
        received = 0  # input messages dealt with, for the progress reports
        # None to a gateway that did not ask: one older than them ends the session on them.
        every = PROGRESS_EVERY if claim.progress else 0
        early = EarlyFinals()
        try:
            with served.scope:
                while True:
                    if every and received and received % every == 0:  # all before it is done
                        self.bus.publish(out, wire.Progress(received, claim.epoch).encode())
                    msg = await sub.receive()
                    received += 1
                    served.last_heard = trio.current_time()  # read by _silence_loop
                    if self.bus.reconnects != reconnects:
                        log.warning(
                            "session %s: NATS reconnected, handing it back", claim.session_id
                        )
                        handback = True
                        return
                    item = wire.decode_input(msg.data)
                    if isinstance(item, wire.AudioIn):
                        if item.utt != utt:
                            continue  # audio of an utterance we are not decoding (stale)
                        if early.heard(len(item.pcm)):
                            self.metrics.early_finals.inc(1, "voided")
                        # A sentence's first message carries its pre-roll, and a replay's
                        # may be longer: decode it in steps, so that the event loop ticks
                        # in between (the heartbeat vouches for it) and other sessions of
                        # this worker get their turn (a decoder holds the GIL while it works).
                        pcm = item.pcm
                        for i in range(0, len(pcm), step_bytes):
                            if i:
                                await trio.lowlevel.checkpoint()
                            with self.gate:
                                rec.accept(pcm[i : i + step_bytes])
                        audio_bytes += len(pcm)
                        # decoded, whether or not it ends in a final (a replay restarts it)
                        self.metrics.audio.inc(len(pcm) / bytes_per_s)
                        # Behind (a sentence's pre-roll, a busy core): decode what waits
                        # first, then report one partial that covers it.
                        if (
                            claim.partials
                            and audio_bytes >= next_partial
                            and (not sub.pending or audio_bytes >= next_partial + defer_bytes)
                        ):
                            next_partial = audio_bytes + step
                            with self.gate:
                                hyp = rec.partial()
                            if hyp is not None and hyp.text and hyp.text != last_partial:
                                last_partial = hyp.text
                                self.bus.publish(
                                    out,
                                    _result(
                                        False, utt, audio_bytes // bytes_per_ms, hyp, claim.epoch
                                    ),
                                )
                    elif item.kind == "begin":
                        if utt:  # a replayed utterance restarts the open one
                            await self._finish(rec, audio_bytes / (2 * claim.sample_rate))
                        rec.start()
                        utt, audio_bytes, next_partial, last_partial = item.utt, 0, step, ""
                        early.ended()
                        served.in_utterance = True
                    elif item.kind == "pause":
                        # Speech paused: if the pause closes the sentence, its final pass is
                        # done by the time the gateway says so (or under way). Not with input
                        # waiting behind the hint: speech resumed (the pass would be thrown
                        # away) or the sentence ended (the pass runs now anyway).
                        if (
                            utt
                            and item.utt == utt
                            and rec.early_final
                            and not sub.pending
                            and early.allowed()
                        ):
                            await self._early_final(rec, audio_bytes / (2 * claim.sample_rate))
                            early.ran(audio_bytes)
                    elif item.kind == "end":
                        if utt and item.utt == utt:  # utt 0: none is open
                            ran = early.ended()
                            if ran:
                                self.metrics.early_finals.inc(1, "used")
                            # Its pass already ran: nothing long to announce.
                            audio_s = 0.0 if ran else audio_bytes / (2 * claim.sample_rate)
                            hyp = await self._finish(rec, audio_s)
                            self.metrics.utterances.inc()
                            self.bus.publish(
                                out,
                                _result(
                                    True,
                                    utt,
                                    audio_bytes // bytes_per_ms,
                                    hyp,
                                    claim.epoch,
                                    rec.state,
                                ),
                            )
                            utt = 0
                            served.in_utterance = False
                            if self.draining:
                                return
                    elif item.kind == "close" or item.epoch > claim.epoch:
                        # Closed, or claimed again under a newer epoch (our answer came too
                        # late and another worker serves it): let go, decode nothing twice.
                        return
        except AsrdError as exc:
            self.metrics.errors.inc()
            log.warning("session %s failed: %s", claim.session_id, exc)
            self._last_word(out, wire.Failure(exc.code, exc.reason, claim.epoch).encode())
        except Exception as exc:
            self.metrics.errors.inc()
            log.exception("session %s: engine error", claim.session_id)
            failure = wire.Failure(50000000, f"engine error: {exc!r}", claim.epoch)
            self._last_word(out, failure.encode())
        finally:
            # Given back: the gateway, if it is alive after all, moves the session (a session
            # ended here without a word would wait on a worker that no longer listens).
            if self.draining or handback or served.silent:
                self._last_word(out, wire.Handoff(claim.epoch).encode())
            try:
                self.engine.release(rec)
            except Exception:  # an engine bug: the session is over anyway; the worker is not
                log.exception("session %s: engine error giving its decoder back", claim.session_id)
            del self.sessions[claim.session_id]
            with trio.CancelScope(shield=True):
                await self.bus.unsubscribe(sub)
                served.done.set()
                await self._update_claim_subscription()

    def _last_word(self, subject: str, data: bytes) -> None:
        """A session's failure or handoff, sent as it ends. It may fail as what ended the
        session did (the outbox is full while NATS is away): raised here, it would skip the
        session's cleanup and end the worker with every session it serves. Its gateway,
        hearing nothing, fails the session over or ends it."""
        try:
            self.bus.publish(subject, data)
        except BusError as exc:
            log.warning("%s not sent: %s", subject, exc)

    def health_routes(self) -> dict[str, Callable[[], tuple[int, bytes]]]:
        """/metrics, /healthz and /readyz for :func:`asrd.httpserve.serve_http`."""

        def ready() -> tuple[int, bytes]:
            ok = self.bus.connected and not self.draining
            return (200, b"ready\n") if ok else (503, b"not ready\n")

        return {
            "/metrics": lambda: (200, self.metrics.registry.render()),
            "/healthz": lambda: (200, b"ok\n"),
            "/readyz": ready,
        }

    def _heartbeat(self) -> bytes:
        # Every beat repeats the pause still announced, so a regular beat sent between the
        # announcement and the pause does not cancel it.
        grace_s = max(0.0, self._pause_until - time.monotonic())
        return wire.Heartbeat(
            self.id,
            self.config.pool,
            self.engine.name,
            self.engine.capacity,
            max(self.free, 0),
            self.draining,
            grace_s,
        ).encode()

    def _beat(self) -> None:
        """A heartbeat now, from the event loop (the state changed)."""
        try:
            self.bus.publish(heartbeat_subject(self.prefix), self._heartbeat())
        except BusError as exc:
            log.warning("heartbeat not sent: %s", exc)

    def _regular_beat(self) -> bytes | None:
        """The periodic heartbeat, made on the bus's I/O thread: a decoder busy for a moment
        on a loaded machine delays the event loop, not this. If the event loop itself stops
        making progress for ``STALL_S`` (beyond an announced pause), the beats stop and the
        gateways move its sessions elsewhere."""
        now = time.monotonic()
        if now - self._progress > STALL_S + max(0.0, self._pause_until - now):
            return None
        return self._heartbeat()

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval_s
        stop = self.bus.publish_every(heartbeat_subject(self.prefix), self._regular_beat, interval)
        self._stop_beats = stop
        try:
            while True:
                self._progress = time.monotonic()
                await trio.sleep(interval)
        finally:
            stop()

    async def _silence_loop(self) -> None:
        """Free the decoder of a session whose gateway has sent nothing (not even its
        keepalive) for ``session_idle_timeout_s``: it died or lost the session. One timer for
        all sessions, checked four times per timeout, instead of a cancel scope per message."""
        idle_s = self.config.session_idle_timeout_s
        while True:
            await trio.sleep(idle_s / 4)
            self._free_silent(trio.current_time(), idle_s)

    def _free_silent(self, now: float, idle_s: float) -> None:
        for session_id, served in list(self.sessions.items()):
            if not self.bus.connected or served.inbox.pending:
                # NATS is down: wait for it, then for the gateway. Or its messages wait for
                # us (a long final pass kept this loop busy): the gateway is not silent.
                served.last_heard = now
            elif now - served.last_heard >= idle_s:
                with logs.about(session_id, served.claim.task_id):
                    log.warning("session %s: gateway silent, freeing decoder", session_id)
                served.silent = True
                served.scope.cancel()

    async def _early_final(self, rec: Recognizer, audio_s: float) -> None:
        """The final pass run at a pause (:meth:`Recognizer.pause`), announced like any."""
        async with self._pause(audio_s * rec.final_cost):
            with self.gate:
                rec.pause()

    async def _finish(self, rec: Recognizer, audio_s: float) -> Hypothesis:
        """An utterance's final pass, also one thrown away: it may take as long as a decode
        of the whole utterance, so it waits for its turn at a core and is announced."""
        async with self._pause(audio_s * rec.final_cost):
            with self.gate:
                return rec.finish()

    @asynccontextmanager
    async def _pause(self, pause_s: float) -> AsyncIterator[None]:
        """Around a final pass that holds the GIL (no heartbeats): say first how long it may
        take, and take it back once every pass announced is over, so that a worker killed
        later is not covered by what is left of a generous estimate."""
        if pause_s <= self.config.heartbeat_interval_s:
            yield
            return
        self._pauses += 1
        try:
            self._pause_until = max(self._pause_until, time.monotonic() + 2 * pause_s + 1.0)
            self._beat()
            try:
                await self.bus.flush()
            except BusError as exc:
                log.warning("pause not announced: %s", exc)
            yield
        finally:
            self._pauses -= 1
            if not self._pauses:
                self._pause_until = 0.0


def _result(
    final: bool, utt: int, audio_ms: int, hyp: Hypothesis, epoch: int, state: str = ""
) -> bytes:
    words = tuple((w.text, w.start_ms, w.end_ms) for w in hyp.words)
    return wire.Result(final, utt, audio_ms, hyp.text, words, hyp.confidence, epoch, state).encode()
