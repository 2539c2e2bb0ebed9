"""Dialect-neutral session events.

Dialect codecs (``asrd.dialects``) translate their wire messages into the client events here
and render the result events back into wire messages; the session only ever sees these.
All times are integer milliseconds from the start of the audio stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from asrd.params import SessionParams

# --- from the client -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartRequested:
    """The client asked to start transcribing with these parameters."""

    task_id: str
    appkey: str
    params: SessionParams


@dataclass(frozen=True, slots=True)
class ControlRequested:
    """Mid-stream parameter change; ``changes`` holds only the keys the dialect understood."""

    changes: dict[str, object]


@dataclass(frozen=True, slots=True)
class StopRequested:
    """The client has sent all its audio; flush, complete and end."""


@dataclass(frozen=True, slots=True)
class AudioReceived:
    data: bytes


ClientCommand = StartRequested | ControlRequested | StopRequested  # text messages
ClientEvent = ClientCommand | AudioReceived

# --- to the client ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Word:
    text: str
    start_ms: int
    end_ms: int


@dataclass(frozen=True, slots=True)
class TranscriptionStarted:
    session_id: str


@dataclass(frozen=True, slots=True)
class SentenceBegin:
    index: int  # from 1
    time_ms: int  # stream time at which speech of this sentence began


@dataclass(frozen=True, slots=True)
class ResultChanged:
    """An intermediate (partial) hypothesis of the current sentence."""

    index: int
    time_ms: int  # audio processed so far
    text: str
    words: tuple[Word, ...] = ()
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class SentenceEnd:
    index: int
    time_ms: int  # stream time at which the sentence was closed
    begin_time_ms: int  # == the SentenceBegin time of this sentence
    text: str
    confidence: float  # 0.0 .. 1.0
    words: tuple[Word, ...] = field(default=())
    timed_out: bool = False  # force-closed at the maximum sentence length


@dataclass(frozen=True, slots=True)
class TranscriptionCompleted:
    pass


@dataclass(frozen=True, slots=True)
class TaskFailed:
    code: int
    reason: str


ServerEvent = (
    TranscriptionStarted
    | SentenceBegin
    | ResultChanged
    | SentenceEnd
    | TranscriptionCompleted
    | TaskFailed
)
