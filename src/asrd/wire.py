"""Messages between gateways and engine workers (documented in docs/engine-protocol.md).

Plain JSON and one binary frame type, so that engines in any language can join the bus.
Audio frames are binary to stay cheap on the hot path: ``b"A"`` + big-endian u32 utterance
number + PCM16LE mono at the session's sample rate. Every other message is a JSON object.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from asrd.errors import BusError

T = TypeVar("T")
_AUDIO = b"A"
_UTT = struct.Struct(">I")
# A session id becomes a NATS subject token (docs/engine-protocol.md): no '.', '*', '>' or space.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_GRACE_S = 600.0  # the longest pause a heartbeat may announce (a foreign one may say more)
MAX_STATE_CHARS = 4096  # a session's engine state (pocketsphinx's: ~100-400 characters)


def _wire_errors(fn: Callable[[bytes], T]) -> Callable[[bytes], T]:
    """Missing keys, wrong types and absurd numbers (``1e400`` overflows ``int()``) from a
    foreign engine become BusError, not crashes."""

    def wrapper(data: bytes) -> T:
        try:
            return fn(data)
        except (KeyError, TypeError, ValueError, IndexError, ArithmeticError) as exc:
            raise BusError(f"malformed message on the bus: {exc!r}") from exc

    return wrapper


def _loads(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting beyond the limit
        raise BusError(f"malformed message on the bus: {exc!r}") from exc
    if not isinstance(obj, dict):
        raise BusError("malformed message on the bus: not a JSON object")
    return obj


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# --- gateway -> worker: claim ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    session_id: str
    sample_rate: int
    partials: bool
    epoch: int = 0  # bumped by every failover; results carry it back
    task_id: str = ""  # the client's, for the worker's log lines only
    # The gateway understands progress results (flow control): a worker sends them only
    # then, since a gateway older than them ends the session on a result it does not know.
    progress: bool = False
    # The session's engine state (Recognizer.state) with its last final result: a claim after
    # a failover carries it, so that the next worker decodes the rest as the last one would.
    state: str = ""

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "session_id": self.session_id,
            "sample_rate": self.sample_rate,
            "partials": self.partials,
            "epoch": self.epoch,
            "task_id": self.task_id,
        }
        if self.progress:
            obj["progress"] = True
        if self.state:
            obj["state"] = self.state
        return _dumps(obj)


@dataclass(frozen=True, slots=True)
class ClaimReply:
    ok: bool
    worker_id: str = ""
    code: int = 0
    reason: str = ""
    # The worker reports progress after every this many input messages (0: it never does,
    # and its gateway cannot slow a client down to its pace).
    progress: int = 0
    # The worker wants ``pause`` hints: its engine starts a final pass early on them.
    pauses: bool = False

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "ok": self.ok,
            "worker_id": self.worker_id,
            "code": self.code,
            "reason": self.reason,
        }
        if self.progress:
            obj["progress"] = self.progress
        if self.pauses:
            obj["pauses"] = True
        return _dumps(obj)


@_wire_errors
def decode_claim(data: bytes) -> Claim:
    obj = _loads(data)
    session_id = obj["session_id"]
    if not (isinstance(session_id, str) and _SESSION_ID.fullmatch(session_id)):
        raise BusError("malformed claim: session_id must be 1-128 of A-Z a-z 0-9 _ -")
    task_id = obj.get("task_id", "")
    if not (isinstance(task_id, str) and (not task_id or _SESSION_ID.fullmatch(task_id))):
        raise BusError("malformed claim: task_id must be 0-128 of A-Z a-z 0-9 _ -")
    return Claim(
        session_id,
        int(obj["sample_rate"]),
        bool(obj.get("partials")),
        int(obj.get("epoch", 0)),
        task_id,
        bool(obj.get("progress")),
        _state(obj.get("state", "")),
    )


@_wire_errors
def decode_claim_reply(data: bytes) -> ClaimReply:
    obj = _loads(data)
    return ClaimReply(
        bool(obj["ok"]),
        str(obj.get("worker_id", "")),
        int(obj.get("code", 0)),
        str(obj.get("reason", "")),
        max(0, int(obj.get("progress", 0))),
        obj.get("pauses") is True,
    )


# --- gateway -> worker: session input --------------------------------------------------------


def encode_audio(utt: int, pcm: bytes) -> bytes:
    return _AUDIO + _UTT.pack(utt) + pcm


def encode_control(kind: str, utt: int = 0, epoch: int = 0) -> bytes:
    """``begin``/``end``/``pause`` of an utterance, ``keepalive``, or ``close`` of the session.

    ``keepalive`` carries the gateway's current claim epoch: a worker still decoding under an
    older claim (one it answered too late) lets go when it sees it."""
    if epoch:
        return _dumps({"type": kind, "utt": utt, "epoch": epoch})
    return _dumps({"type": kind, "utt": utt})


@dataclass(frozen=True, slots=True)
class AudioIn:
    utt: int
    pcm: bytes


@dataclass(frozen=True, slots=True)
class ControlIn:
    kind: str
    utt: int
    epoch: int = 0


@_wire_errors
def decode_input(data: bytes) -> AudioIn | ControlIn:
    if data[:1] == _AUDIO:
        if len(data) < 5:
            raise BusError("truncated audio frame on the bus")
        return AudioIn(_UTT.unpack_from(data, 1)[0], data[5:])
    obj = _loads(data)
    return ControlIn(str(obj["type"]), int(obj.get("utt", 0)), int(obj.get("epoch", 0)))


# --- worker -> gateway: results --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    final: bool
    utt: int
    audio_ms: int  # utterance audio the engine had consumed for this result
    text: str
    words: tuple[tuple[str, int, int], ...]  # (text, start_ms, end_ms) from the utterance start
    confidence: float
    epoch: int = 0  # of the claim this result was decoded under
    state: str = ""  # a final's: the session's engine state after it (Claim.state)

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "type": "final" if self.final else "partial",
            "utt": self.utt,
            "audio_ms": self.audio_ms,
            "text": self.text,
            "words": [list(w) for w in self.words],
            "confidence": round(self.confidence, 4),
            "epoch": self.epoch,
        }
        if self.state:
            obj["state"] = self.state
        return _dumps(obj)


@dataclass(frozen=True, slots=True)
class Failure:
    code: int
    reason: str
    epoch: int = 0  # of the claim the session was served under, as for results

    def encode(self) -> bytes:
        return _dumps(
            {"type": "error", "code": self.code, "reason": self.reason, "epoch": self.epoch}
        )


@dataclass(frozen=True, slots=True)
class Handoff:
    """The worker gives the session back (it drains, or its NATS link dropped): the gateway
    claims a worker again and replays its journal."""

    epoch: int = 0

    def encode(self) -> bytes:
        return _dumps({"type": "handoff", "epoch": self.epoch})


@dataclass(frozen=True, slots=True)
class Progress:
    """How many of the session's input messages the worker has dealt with under its claim:
    the gateway sends no more audio while too many are unacknowledged."""

    received: int
    epoch: int = 0

    def encode(self) -> bytes:
        return _dumps({"type": "progress", "received": self.received, "epoch": self.epoch})


@_wire_errors
def decode_output(data: bytes) -> Result | Failure | Handoff | Progress:
    obj = _loads(data)
    kind = obj.get("type")
    if kind == "progress":
        return Progress(int(obj["received"]), int(obj.get("epoch", 0)))
    if kind == "error":
        return Failure(int(obj["code"]), str(obj["reason"]), int(obj.get("epoch", 0)))
    if kind == "handoff":
        return Handoff(int(obj.get("epoch", 0)))
    if kind not in ("partial", "final"):
        raise BusError(f"unknown result type {kind!r} from worker")
    return Result(
        final=kind == "final",
        utt=int(obj["utt"]),
        audio_ms=int(obj.get("audio_ms", 0)),
        text=str(obj["text"]),
        words=tuple((str(w[0]), int(w[1]), int(w[2])) for w in obj.get("words", ())),
        confidence=float(obj.get("confidence", 0.0)),
        epoch=int(obj.get("epoch", 0)),
        state=_state(obj.get("state", "")),
    )


def _state(state: object) -> str:
    if not (isinstance(state, str) and len(state) <= MAX_STATE_CHARS):
        raise BusError(f"malformed state: not a string of at most {MAX_STATE_CHARS} characters")
    return state


# --- worker -> everyone: heartbeat -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Heartbeat:
    worker_id: str
    pool: str
    engine: str
    capacity: int
    free: int
    draining: bool = False
    grace_s: float = 0.0  # the worker will be busy (and silent) for up to this long
    leaving: bool = False  # its last beat: it stops now (drained), no beat follows

    def encode(self) -> bytes:
        return _dumps(
            {
                "worker_id": self.worker_id,
                "pool": self.pool,
                "engine": self.engine,
                "capacity": self.capacity,
                "free": self.free,
                "draining": self.draining,
                "grace_s": self.grace_s,
                "leaving": self.leaving,
            }
        )


@_wire_errors
def decode_heartbeat(data: bytes) -> Heartbeat:
    obj = _loads(data)
    return Heartbeat(
        str(obj["worker_id"]),
        str(obj["pool"]),
        str(obj.get("engine", "")),
        int(obj.get("capacity", 0)),
        int(obj.get("free", 0)),
        bool(obj.get("draining", False)),
        _grace(float(obj.get("grace_s", 0.0))),
        bool(obj.get("leaving", False)),
    )


def _grace(grace_s: float) -> float:
    """A pause of 0..MAX_GRACE_S: NaN or infinity would keep a dead worker alive for ever."""
    return min(grace_s, MAX_GRACE_S) if math.isfinite(grace_s) and grace_s > 0 else 0.0
