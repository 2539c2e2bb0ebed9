"""The gateway's end of a session's link to its engine worker.

Claims a worker, forwards utterance audio fire-and-forget, and keeps a journal of everything
sent since the last finalised utterance: the audio a replacement worker needs to continue the
session without losing or duplicating a sentence.
"""

from __future__ import annotations

import logging

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
from asrd.errors import AsrdError, EngineFailed, NoWorkers, ServerError, TooManyRequests
from asrd.registry import WorkerRegistry

log = logging.getLogger(__name__)

KEEPALIVE_S = 1.0
CLAIM_ATTEMPTS = 3


class RemoteRecognizer:
    def __init__(
        self,
        bus: Bus,
        registry: WorkerRegistry,
        *,
        prefix: str,
        session_id: str,
        pool: str,
        sample_rate: int,
        partials: bool,
        claim_timeout_s: float,
    ) -> None:
        self._bus = bus
        self._registry = registry
        self._prefix = prefix
        self.session_id = session_id
        self.pool = pool
        self._claim = wire.Claim(session_id, sample_rate, partials)
        self._claim_timeout_s = claim_timeout_s
        self._in_subject = session_in(prefix, session_id)
        self.worker_id = ""
        self.results: Subscription | None = None
        # Messages sent since the last finalised utterance, in order (for replay).
        self.journal: list[bytes] = []
        self._journal_utt: list[int] = []

    async def open(self) -> None:
        """Subscribe to results first (nothing may be missed), then claim a worker."""
        self.results = await self._bus.subscribe(
            session_out(self._prefix, self.session_id), max_pending=1024
        )
        await self._claim_worker()

    async def _claim_worker(self) -> None:
        subject = claim_subject(self._prefix, self.pool)
        data = self._claim.encode()
        for _ in range(CLAIM_ATTEMPTS):
            try:
                raw = await self._bus.request(subject, data, self._claim_timeout_s)
            except NoResponders:
                alive = self._registry.alive(self.pool)
                if alive:
                    capacity = sum(b.capacity for b in alive)
                    raise TooManyRequests(
                        f"all {capacity} decoders of pool {self.pool!r} are busy; retry later"
                    ) from None
                raise NoWorkers(f"no engine worker serves pool {self.pool!r}") from None
            except BusTimeout:
                raise ServerError(f"no engine worker of pool {self.pool!r} answered") from None
            reply = wire.decode_claim_reply(raw)
            if reply.ok:
                self.worker_id = reply.worker_id
                return
            if reply.code != TooManyRequests.code:
                raise AsrdError(reply.reason, code=reply.code)
        raise TooManyRequests(f"all decoders of pool {self.pool!r} are busy; retry later")

    def _send(self, utt: int, data: bytes) -> None:
        self.journal.append(data)
        self._journal_utt.append(utt)
        self._bus.publish(self._in_subject, data)

    def begin(self, utt: int) -> None:
        self._send(utt, wire.encode_control("begin", utt))

    def audio(self, utt: int, pcm: bytes) -> None:
        self._send(utt, wire.encode_audio(utt, pcm))

    def end(self, utt: int) -> None:
        self._send(utt, wire.encode_control("end", utt))

    def finalized(self, utt: int) -> None:
        """Forget journal entries of utterances up to ``utt``: they can never be needed again."""
        keep = 0
        while keep < len(self._journal_utt) and self._journal_utt[keep] <= utt:
            keep += 1
        if keep:
            del self.journal[:keep]
            del self._journal_utt[:keep]

    async def watch_loop(self) -> None:
        """Keep the worker's claim alive and fail the session if the worker dies."""
        dead = self._registry.dead(self.worker_id)
        while True:
            with trio.move_on_after(KEEPALIVE_S):
                await dead.wait()
                raise EngineFailed(f"engine worker {self.worker_id} stopped responding")
            self._bus.publish(self._in_subject, wire.encode_control("keepalive"))

    async def aclose(self) -> None:
        if self.worker_id:
            try:
                self._bus.publish(self._in_subject, wire.encode_control("close"))
            except AsrdError as exc:
                log.debug("close not sent: %s", exc)
        if self.results is not None:
            await self._bus.unsubscribe(self.results)
