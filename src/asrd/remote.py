"""The gateway's end of a session's link to its engine worker.

Claims a worker, forwards utterance audio fire-and-forget, and keeps a journal of everything
sent since the last finalised utterance. The journal is what makes a session outlive its
worker: when the worker dies (heartbeats stop), hands the session back (it drains, or its own
NATS link dropped) or the bus reconnects (messages may have been lost either way), the link
claims a worker again and replays the journal. The worker restarts any utterance it is given
again, and the sentence tracker drops results it has already delivered, so the client sees
every sentence exactly once, with the same index and times.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
from collections.abc import Iterable, Iterator

import trio

from asrd import wire
from asrd.bus import (
    Bus,
    BusTimeout,
    NoResponders,
    Subscription,
    claim_subject,
    session_in,
    session_out,
)
from asrd.errors import (
    AsrdError,
    BusError,
    ClientError,
    EngineFailed,
    NoWorkers,
    ServerError,
    TooManyRequests,
)
from asrd.registry import WorkerRegistry

log = logging.getLogger(__name__)

REPLAY_AUDIO_BYTES = 64 * 1024  # audio per replayed message
KEEPALIVE_S = 1.0
BUSY_WAIT_S = 0.5  # how long a claim waits for a decoder to come free before 40000005
CLAIM_ATTEMPTS = 3  # claims sent, each waiting claim_timeout_s, before "no worker answered"
# Input messages a worker that reports its progress may have unacknowledged before the session
# reads no more of its client (TCP then slows the client down): a client that sends faster
# than its decoder keeps up goes at the decoder's pace instead of overflowing its input (4096
# messages at the worker). 512 messages are 51 s of audio in 100 ms frames, 5 s in 10 ms ones.
ENGINE_WINDOW = 512
# Waiting for a worker that acknowledges nothing for this long ends the session. A dead or
# stuck worker is noticed sooner, by its heartbeats; this is the backstop for one that beats
# but has lost track of the session. Not while the session moves to another worker (the
# failover has its own deadline), nor during a pause its worker announced (grace_s, up to
# 600 s: a long final pass acknowledges nothing either); it counts from the pause's end.
ENGINE_STALL_S = 60.0


class RemoteRecognizer:
    def __init__(
        self,
        bus: Bus,
        registry: WorkerRegistry,
        *,
        prefix: str,
        session_id: str,
        task_id: str,
        pool: str,
        sample_rate: int,
        partials: bool,
        claim_timeout_s: float,
        failover_timeout_s: float = 10.0,
        journal_max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._bus = bus
        self._registry = registry
        self._prefix = prefix
        self.session_id = session_id
        self.pool = pool
        self._claim = wire.Claim(session_id, sample_rate, partials, task_id=task_id, progress=True)
        self._claim_timeout_s = claim_timeout_s
        self._failover_timeout_s = failover_timeout_s
        self._journal_max_bytes = journal_max_bytes
        self._in_subject = session_in(prefix, session_id)
        self.worker_id = ""
        self.results: Subscription | None = None
        # Messages sent since the last finalised utterance, in order, and the utterance of
        # each: two lists, not a tuple per message, which would be one more object for the
        # cyclic collector to examine, thousands a second in a loaded gateway (its pauses
        # stop every session: docs/benchmarks.md).
        self.journal: list[bytes] = []
        self._journal_utts: list[int] = []
        self._journal_bytes = 0
        self._paused = False  # failing over: journal only, publish at replay
        self._pause_hints = False  # the worker asked for ``pause`` (wire.ClaimReply.pauses)
        self._handoff = False  # the worker asked us to move the session
        self._attention = trio.Event()  # set on a handoff or when the worker is declared dead
        self.failovers = 0
        self.epoch = 0  # of the current claim; results of older claims are void
        self._reconnects_seen = bus.reconnects
        # Flow control, under the current claim: how many input messages its worker
        # acknowledged, how often it does (0: never, so no flow control), and the sizes of
        # those published since, and their sum: the journal holds them all, and 512 frames of
        # 64 KiB would overflow it before the window is reached.
        self._acked = 0
        self._window = 0
        self._every = 0
        self._progressed = trio.Event()
        self._unacked: collections.deque[int] = collections.deque()
        self._unacked_bytes = 0
        self._window_bytes = journal_max_bytes // 4

    async def open(self) -> None:
        """Subscribe to results first (nothing may be missed), then claim a worker."""
        # The bus never cancels a subscribe half-way, and _claim_worker no claim.
        self.results = await self._bus.subscribe(
            session_out(self._prefix, self.session_id), max_pending=1024
        )
        await self._claim_worker()

    async def _claim_worker(self) -> None:
        subject = claim_subject(self._prefix, self.pool)
        data = dataclasses.replace(self._claim, epoch=self.epoch).encode()
        # A decoder freed by a session that just ended comes back a moment later: a client
        # reconnecting at once should not be told "busy" for that.
        busy_until = trio.current_time() + BUSY_WAIT_S
        unanswered = late_refusals = 0
        while True:
            await trio.lowlevel.checkpoint_if_cancelled()  # no new claim once the session ended
            try:
                # Shielded (bounded by claim_timeout_s): a claim cancelled on its way (the
                # session ended, a failover's deadline passed) can still be taken, and then
                # the close that ends the session goes out before that worker listens: it
                # would hold a decoder for nobody until its silence timeout. Answered, the
                # worker listens (it subscribes before it answers) and the close reaches it.
                with trio.CancelScope(shield=True):
                    raw = await self._bus.request(subject, data, self._claim_timeout_s)
            except BusTimeout:
                # NATS gave the claim to a member of the queue group that never answered: a
                # worker that died or hangs keeps its subscription until the server or the
                # process notices. Ask again; the group picks a member at random.
                # If a slow worker took the claim after all, the close lets it go (if it
                # listens already), and whatever it decodes is void (a new epoch). Published
                # before the next claim, so the worker that takes that one never sees it. Also
                # after the last attempt: a failover claims again, and the claim that then
                # succeeds must not share this one's epoch.
                self._publish_quietly(wire.encode_control("close"))
                self.epoch += 1
                unanswered += 1
                if unanswered >= CLAIM_ATTEMPTS:
                    raise ServerError(
                        f"no engine worker of pool {self.pool!r} answered "
                        f"{CLAIM_ATTEMPTS} claims of {self._claim_timeout_s:g} s"
                    ) from None
                data = dataclasses.replace(self._claim, epoch=self.epoch).encode()
                busy_until = trio.current_time() + BUSY_WAIT_S
                continue
            except NoResponders:
                alive = self._registry.alive(self.pool)
                if not alive:
                    raise NoWorkers(f"no engine worker serves pool {self.pool!r}") from None
                if trio.current_time() >= busy_until:
                    capacity = sum(b.capacity for b in alive)
                    raise TooManyRequests(
                        f"all {capacity} decoders of pool {self.pool!r} are busy; retry later"
                    ) from None
                await trio.sleep(0.05)
                continue
            reply = wire.decode_claim_reply(raw)
            if reply.ok:
                self.worker_id = reply.worker_id
                # The worker counts from its claim: so do we. A wider window than the
                # worker's reports would wait for a report that never comes.
                self._acked = self._unacked_bytes = 0
                self._unacked.clear()
                self._every = reply.progress
                self._pause_hints = reply.pauses
                self._window = max(ENGINE_WINDOW, 2 * reply.progress) if reply.progress else 0
                self._wake()
                return
            if reply.code != TooManyRequests.code:
                raise AsrdError(reply.reason, code=reply.code)
            # The worker filled up between subscribing and our claim (claims raced to it, or
            # a decoder is still being released): like no responders, retry for a moment.
            # It left the claim queue group before it answered, so the next claim reaches
            # only workers with a free decoder, or nobody (no responders, above). An answer
            # that came late, from a worker too loaded to answer at once, must not cost the
            # session the other workers' free decoders: past the deadline, each alive worker
            # of the pool (at least one) may still refuse once.
            if trio.current_time() >= busy_until:
                late_refusals += 1
                if late_refusals > max(1, len(self._registry.alive(self.pool))):
                    raise TooManyRequests(
                        f"all decoders of pool {self.pool!r} are busy; retry later"
                    )
            await trio.sleep(0.05)

    # --- input -----------------------------------------------------------------------------

    def _send(self, utt: int, data: bytes) -> None:
        self.journal.append(data)
        self._journal_utts.append(utt)
        self._journal_bytes += len(data)
        if self._journal_bytes > self._journal_max_bytes:
            if self._journal_utts[0] == utt:  # all of it is the open sentence: the client's doing
                raise ClientError(
                    f"a sentence longer than {self._journal_max_bytes} bytes of audio cannot "
                    "be kept for failover: leave enable_ignore_sentence_timeout off, or let "
                    "sentences end sooner"
                )
            raise EngineFailed(
                f"the engine fell more than {self._journal_max_bytes} bytes of audio behind"
            )
        if not self._paused:
            self._publish(data)

    def _publish(self, data: bytes) -> None:
        self._bus.publish(self._in_subject, data)
        if self._window:
            self._unacked.append(len(data))
            self._unacked_bytes += len(data)

    @property
    def engine_behind(self) -> bool:
        """Whether the worker has more input unacknowledged than the session may send ahead:
        more messages than the window, or a quarter of the journal in messages that are owed
        two reports at least (fewer may never be reported: nothing more is sent meanwhile)."""
        if not self._window:
            return False
        unacked = len(self._unacked)
        return unacked > self._window or (
            unacked >= 2 * self._every and self._unacked_bytes > self._window_bytes
        )

    async def wait_for_engine(self) -> None:
        """Until the worker has caught up to within the window (or the session moved)."""
        while self.engine_behind:
            event = self._progressed
            since = trio.current_time()
            deadline = since + ENGINE_STALL_S
            while True:
                with trio.move_on_at(deadline):
                    await event.wait()
                if event.is_set():
                    break
                now = trio.current_time()
                if self._paused:
                    deadline = now + ENGINE_STALL_S
                elif (pause_end := self._registry.paused_until(self.worker_id)) > now:
                    deadline = pause_end + ENGINE_STALL_S
                else:
                    raise EngineFailed(
                        f"engine worker {self.worker_id} acknowledged none of "
                        f"{len(self._unacked)} messages for {now - since:.0f} s"
                    )

    def progressed(self, progress: wire.Progress) -> None:
        """The worker of the current claim reports how much of its input it has dealt with."""
        if self._window and progress.epoch == self.epoch and progress.received > self._acked:
            acked = min(progress.received, self._acked + len(self._unacked))
            for _ in range(acked - self._acked):
                self._unacked_bytes -= self._unacked.popleft()
            self._acked = acked
            self._wake()

    def _wake(self) -> None:
        self._progressed.set()
        self._progressed = trio.Event()

    def begin(self, utt: int) -> None:
        self._send(utt, wire.encode_control("begin", utt))

    def audio(self, utt: int, pcm: bytes) -> None:
        self._send(utt, wire.encode_audio(utt, pcm))

    def end(self, utt: int) -> None:
        self._send(utt, wire.encode_control("end", utt))

    def pause(self, utt: int) -> None:
        """Speech paused in ``utt``, to a worker that asked: it may run the final pass now.
        Only a hint, so not journaled: a worker that replays the journal runs it at ``end``."""
        if self._pause_hints and not self._paused:
            self._publish(wire.encode_control("pause", utt))

    def finalized(self, utt: int, state: str = "") -> None:
        """Forget journal entries of utterances up to ``utt``: they can never be needed again.
        A worker that takes the session over starts from ``state``, the engine's after it."""
        self._claim = dataclasses.replace(self._claim, state=state)
        keep = bisect.bisect_right(self._journal_utts, utt)  # utterances only go up
        if keep:
            journal = self.journal
            self._journal_bytes -= sum(len(data) for data in journal[:keep])
            del journal[:keep]
            del self._journal_utts[:keep]

    def current_epoch(self, item: wire.Failure | wire.Handoff) -> bool:
        """Whether a failure or handoff comes from the worker of the current claim."""
        return item.epoch == self.epoch

    def current(self, result: wire.Result) -> bool:
        """Whether ``result`` may be trusted: decoded under the current claim, and not while
        a reconnect (which may have lost audio on the way) still awaits its replay."""
        return result.epoch == self.epoch and self._bus.reconnects == self._reconnects_seen

    def handoff_requested(self) -> None:
        """The worker gave the session back (it drains, or its NATS link dropped): move it now."""
        self._handoff = True
        self._attention.set()

    # --- supervision -------------------------------------------------------------------------

    async def watch_loop(self) -> None:
        """Keep the claim alive; move the session when its worker dies or leaves.

        One event wakes this loop for either reason (the registry sets it when the worker is
        declared dead, :meth:`handoff_requested` when it asks to give the session back), so
        an idle session costs one timer a second, not a task per reason."""
        reconnects = self._reconnects_seen  # a reconnect during open() counts too
        while True:
            watch = self._registry.watch(self.worker_id, self._attention)
            try:
                with trio.move_on_after(KEEPALIVE_S):
                    await self._attention.wait()
            finally:
                watch.cancel()
            if self._attention.is_set():
                self._attention = trio.Event()
            if self._handoff or watch.left:
                # A worker stopping cleanly gives its sessions back, then says goodbye, and
                # the two may be read in either order: no warning for either.
                why = "gave the session back" if self._handoff else "left"
                self._handoff = False
                await self._failover(f"engine worker {self.worker_id} {why}", level=logging.INFO)
            elif watch.dead:
                await self._failover(f"engine worker {self.worker_id} stopped responding")
            elif self._bus.reconnects != reconnects:
                # Messages in flight when the connection dropped may be lost in either
                # direction: give the (same or another) worker the journal again.
                reconnects = self._bus.reconnects
                await self._failover("the bus reconnected")
                self._reconnects_seen = reconnects
            else:
                self._publish_quietly(wire.encode_control("keepalive", epoch=self.epoch))

    async def _failover(self, why: str, *, level: int = logging.WARNING) -> None:
        log.log(level, "session %s: %s; claiming a worker again", self.session_id, why)
        self._paused = True
        self.epoch += 1
        # If the old worker is alive after all (overloaded, or only the bus dropped), it must
        # let go: a session is decoded by one worker at a time. Published before the claim,
        # so the worker taking over never sees this close.
        self._publish_quietly(wire.encode_control("close"))
        last: AsrdError | None = None
        claimed = False
        with trio.move_on_after(self._failover_timeout_s):
            while not claimed:
                try:
                    await self._claim_worker()
                    claimed = True
                except (NoWorkers, TooManyRequests, ServerError) as exc:
                    last = exc
                    await trio.sleep(0.2)
        if not claimed:
            raise EngineFailed(
                f"{why}, and no engine worker took the session over within "
                f"{self._failover_timeout_s:g} s ({last.reason if last else 'no answer'})"
            )
        for data in _replay(self.journal):  # no checkpoint in between: the order is kept
            self._publish(data)
        self._paused = False
        self.failovers += 1
        log.log(level, "session %s continues on worker %s", self.session_id, self.worker_id)

    def _publish_quietly(self, data: bytes) -> None:
        try:
            self._publish(data)
        except BusError as exc:
            log.debug("keepalive not sent: %s", exc)

    async def aclose(self) -> None:
        if self.worker_id:
            self._publish_quietly(wire.encode_control("close"))
        if self.results is not None:
            await self._bus.unsubscribe(self.results)


def _replay(journal: Iterable[bytes]) -> Iterator[bytes]:
    """The journal as messages to replay, consecutive audio of one utterance merged into
    messages of up to REPLAY_AUDIO_BYTES: a worker's input holds a bounded number of messages
    (4096), and a journal of 10 ms frames can hold many more."""
    utt, pcm = 0, bytearray()
    for data in journal:
        item = wire.decode_input(data)
        if isinstance(item, wire.AudioIn):
            if pcm and (item.utt != utt or len(pcm) + len(item.pcm) > REPLAY_AUDIO_BYTES):
                yield wire.encode_audio(utt, bytes(pcm))
                pcm.clear()
            utt = item.utt
            pcm += item.pcm
            continue
        if pcm:
            yield wire.encode_audio(utt, bytes(pcm))
            pcm.clear()
        yield data
    if pcm:
        yield wire.encode_audio(utt, bytes(pcm))
