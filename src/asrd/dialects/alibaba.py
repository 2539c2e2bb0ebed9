"""Sans-IO codec for the Alibaba NLS ``SpeechTranscriber`` protocol (README, "The protocol
asrd speaks").

Shaped like h11/wsproto: one :class:`AlibabaCodec` per WebSocket connection turns received
frames into :mod:`asrd.events` client events and renders server events into text frames. It
does no I/O, so the session owns all timing and the protocol rules are testable synchronously.

Errors the *client* causes are raised as :class:`asrd.errors.ClientError` subclasses carrying
the Alibaba status code; the session reports them with ``render(TaskFailed(e.code, e.reason))``.
Errors the *caller* causes (rendering an event the protocol does not allow now) raise
:class:`LocalProtocolError`: they are bugs in the session, not in the client.

Leniency, decided once for all payload values so that clients built by hand from config
strings work while typos still fail loudly:

- booleans: JSON ``true``/``false``, the strings ``"true"``/``"false"`` in any case, or the
  integers ``0``/``1`` (Alibaba's own MRCP server configuration writes them); anything else
  is rejected.
- integers: JSON integers, integral floats (``800.0``) or decimal strings (``"800"``);
  floats: JSON numbers or numeric strings; NaN and infinities are rejected.
- strings (ids, language): ``""`` means "not set", like an absent key. ``language`` names an
  engine pool (a NATS subject token), so it is limited to ``A-Z a-z 0-9 _ -``.
- ``null`` for any payload key means "not set".
- ``special_word_filter``: an object, or a string holding that object as JSON (the form
  Alibaba's own documentation shows); empty words are dropped before the 32-word limit.
"""

from __future__ import annotations

import enum
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Final

from pydantic import ValidationError

from asrd.errors import (
    SENTENCE_TIMEOUT,
    SUCCESS,
    AlreadyStopping,
    ClientError,
    InvalidDirective,
    InvalidMessage,
    InvalidParameter,
    ServerError,
    UnknownNamespace,
    UnsupportedSampleRate,
)
from asrd.events import (
    AudioReceived,
    ClientCommand,
    ControlRequested,
    ResultChanged,
    SentenceBegin,
    SentenceEnd,
    ServerEvent,
    StartRequested,
    StopRequested,
    TaskFailed,
    TranscriptionCompleted,
    TranscriptionStarted,
    Word,
)
from asrd.params import (
    LANGUAGE_CHARS,
    SUPPORTED_FORMATS,
    SUPPORTED_SAMPLE_RATES,
    SessionParams,
    WordFilter,
)

__all__ = ["NAMESPACE", "AlibabaCodec", "LocalProtocolError"]

NAMESPACE: Final = "SpeechTranscriber"
FAILED_NAMESPACE: Final = "Default"  # the Go SDK exits on any other namespace for TaskFailed
STATUS_TEXT: Final = "Gateway:SUCCESS:Success."
MAX_FILTER_WORDS: Final = 32
# Alibaba's appkeys are 16 characters; a longer one is quoted in replies and logs, so bounded.
MAX_APPKEY_CHARS: Final = 128

START: Final = "StartTranscription"
STOP: Final = "StopTranscription"
CONTROL_NAMES: Final = frozenset({"ControlTranscriber", "ControlTranscription"})  # Py/Go, Node

_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_INT_TEXT = re.compile(r"\s*[+-]?[0-9]{1,12}\s*")
# ASCII decimal only: float() alone also takes "0_1" (as 1.0) and non-ASCII digits ("١").
_FLOAT_TEXT = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")
_LANGUAGE = re.compile(LANGUAGE_CHARS)
_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class LocalProtocolError(ServerError):
    """The caller asked to send an event the protocol does not allow in this state (a bug)."""


class _State(enum.Enum):
    WAITING = "waiting for StartTranscription"
    STARTED = "started"
    STOPPING = "stopping"
    CLOSED = "closed"


# --- value converters: (wire key, JSON value) -> Python value; None means "not set" ----------


def _show(value: object) -> str:
    """Quote client input in a reason without letting it bloat the TaskFailed frame."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _to_bool(key: str, value: object) -> bool:
    if value is True or value is False:
        return value
    if type(value) is int and value in (0, 1):  # Alibaba's own MRCP server config writes 0/1
        return bool(value)
    if isinstance(value, str):
        lowered = value.lower()
        if lowered == "true":
            return True
        if lowered == "false":
            return False
    raise InvalidParameter(f"{key} must be true or false (or 1/0), got {_show(value)}")


def _to_int(key: str, value: object, allowed: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return int(value)
    raise InvalidParameter(f"{key} must be an integer {allowed}, got {_show(value)}")


def _to_float(key: str, value: object, allowed: str) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            number = None
    elif isinstance(value, str) and len(value) <= 32 and _FLOAT_TEXT.fullmatch(value):
        number = float(value)
    if number is None or not math.isfinite(number):
        raise InvalidParameter(f"{key} must be a number {allowed}, got {_show(value)}")
    return number


def _to_str(key: str, value: object) -> str | None:
    if not isinstance(value, str):
        raise InvalidParameter(f"{key} must be a string, got {_show(value)}")
    try:
        value.encode()  # a lone surrogate from a "\\ud800" escape cannot be sent back
    except UnicodeEncodeError:
        raise InvalidParameter(f"{key} is not valid Unicode") from None
    return value or None


def _to_language(key: str, value: object) -> str | None:
    """Without a routing table the language is the pool's name and so a NATS subject token:
    a dot, space or wildcard in it must be the client's 40000003, not a bus error (50000000,
    "retry") quoting the whole string back."""
    text = _to_str(key, value)
    if text is not None and not _LANGUAGE.fullmatch(text):
        raise InvalidParameter(
            f"{key} must be 1 to 64 of A-Z a-z 0-9 _ - (like en-US), got {_show(value)}"
        )
    return text


def _bounds(field: str) -> tuple[float, float]:
    """Read a range from SessionParams so the limits live in one place."""
    lo = hi = None
    for item in SessionParams.model_fields[field].metadata:
        lo = getattr(item, "ge", lo)
        hi = getattr(item, "le", hi)
    assert lo is not None and hi is not None, field
    return lo, hi


def _int_range(field: str, unit: str) -> Callable[[str, object], int]:
    lo, hi = (int(b) for b in _bounds(field))
    allowed = f"from {lo} to {hi}{unit}"

    def convert(key: str, value: object) -> int:
        number = _to_int(key, value, allowed)
        if not lo <= number <= hi:
            raise InvalidParameter(f"{key} must be an integer {allowed}, got {_show(value)}")
        return number

    return convert


def _float_range(field: str) -> Callable[[str, object], float]:
    lo, hi = _bounds(field)
    allowed = f"from {lo} to {hi}"

    def convert(key: str, value: object) -> float:
        number = _to_float(key, value, allowed)
        if not lo <= number <= hi:
            raise InvalidParameter(f"{key} must be a number {allowed}, got {_show(value)}")
        return number

    return convert


def _to_format(key: str, value: object) -> str:
    supported = ", ".join(SUPPORTED_FORMATS)
    if not isinstance(value, str):
        raise InvalidParameter(f"{key} must be a string (one of {supported}), got {_show(value)}")
    lowered = value.lower()
    if lowered not in SUPPORTED_FORMATS:
        raise InvalidParameter(
            f"{key} {_show(value)} is not supported; supported formats: {supported}"
        )
    return lowered


def _to_sample_rate(key: str, value: object) -> int:
    supported = " or ".join(str(rate) for rate in SUPPORTED_SAMPLE_RATES)
    rate = _to_int(key, value, supported)
    if rate not in SUPPORTED_SAMPLE_RATES:
        raise UnsupportedSampleRate(f"{key} {_show(rate)} is not supported; supported: {supported}")
    return rate


def _word_list(key: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidParameter(f'{key} must be an object {{"word_list": [...]}}')
    words = value.get("word_list")
    if words is None:
        return ()
    if not isinstance(words, list):
        raise InvalidParameter(f"{key}.word_list must be a list of strings")
    result: list[str] = []
    for word in words:
        text = _to_str(f"{key}.word_list[]", word)
        if text is not None and text.strip():  # blank entries match nothing: not counted
            result.append(text.strip())
    return tuple(result)


def _to_word_filter(key: str, value: object) -> WordFilter | None:
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise InvalidParameter(f"{key} is a string but not valid JSON") from None
        if value is None:
            return None
    if not isinstance(value, dict):
        raise InvalidParameter(f"{key} must be a JSON object (or a string holding one)")
    reserved = value.get("system_reserved_filter")
    remove = _word_list(f"{key}.filter_with_empty", value.get("filter_with_empty"))
    mask = _word_list(f"{key}.filter_with_signed", value.get("filter_with_signed"))
    if len(remove) + len(mask) > MAX_FILTER_WORDS:
        raise InvalidParameter(
            f"{key} holds {len(remove) + len(mask)} words; at most {MAX_FILTER_WORDS} allowed"
        )
    return WordFilter(
        system_reserved_filter=(
            False if reserved is None else _to_bool(f"{key}.system_reserved_filter", reserved)
        ),
        remove=remove,
        mask=mask,
    )


_Converter = Callable[[str, object], object]

# wire key -> (SessionParams field, converter). Order fixes which error a bad payload reports.
_PARAMS: Final[Mapping[str, tuple[str, _Converter]]] = {
    "format": ("format", _to_format),
    "sample_rate": ("sample_rate", _to_sample_rate),
    "language": ("language", _to_language),
    "enable_intermediate_result": ("enable_intermediate_result", _to_bool),
    "enable_punctuation_prediction": ("enable_punctuation_prediction", _to_bool),
    "enable_inverse_text_normalization": ("enable_inverse_text_normalization", _to_bool),
    "enable_words": ("enable_words", _to_bool),
    "max_sentence_silence": (
        "max_sentence_silence_ms",
        _int_range("max_sentence_silence_ms", " ms"),
    ),
    "enable_semantic_sentence_detection": ("enable_semantic_sentence_detection", _to_bool),
    "speech_noise_threshold": ("speech_noise_threshold", _float_range("speech_noise_threshold")),
    "disfluency": ("disfluency", _to_bool),
    "special_word_filter": ("special_word_filter", _to_word_filter),
    "vocabulary_id": ("vocabulary_id", _to_str),
    "customization_id": ("customization_id", _to_str),
    "enable_ignore_sentence_timeout": ("enable_ignore_sentence_timeout", _to_bool),
    "session_id": ("session_id", _to_str),
}
_WIRE_KEY: Final = {field: key for key, (field, _) in _PARAMS.items()}

# Keys a ControlTranscriber may change mid-stream; anything else is tolerated and dropped.
_CONTROL_KEYS: Final = (
    "max_sentence_silence",
    "enable_intermediate_result",
    "enable_words",
    "enable_punctuation_prediction",
    "enable_inverse_text_normalization",
    "disfluency",
    "speech_noise_threshold",
    "special_word_filter",
)


def _start_params(payload: Mapping[str, object]) -> SessionParams:
    values: dict[str, object] = {}
    for key, (field, convert) in _PARAMS.items():
        raw = payload.get(key)
        if raw is None:
            continue
        value = convert(key, raw)
        if value is not None:
            values[field] = value
    try:
        return SessionParams.model_validate(values)
    except ValidationError as exc:  # only if params.py is stricter than the converters above
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "payload"
        raise InvalidParameter(f"{_WIRE_KEY.get(field, field)}: {error['msg']}") from None


def _control_changes(payload: object) -> dict[str, object]:
    changes: dict[str, object] = {}
    if not isinstance(payload, dict):
        return changes
    for key in _CONTROL_KEYS:
        raw = payload.get(key)
        if raw is None:
            continue
        field, convert = _PARAMS[key]
        try:
            value = convert(key, raw)
        except ClientError:
            continue  # the protocol: tolerate junk, send no reply
        if value is not None:
            changes[field] = value
    return changes


def _words(words: tuple[Word, ...]) -> list[dict[str, object]]:
    return [{"text": w.text, "startTime": int(w.start_ms), "endTime": int(w.end_ms)} for w in words]


def _unit(value: float) -> float:
    """Clamp to [0, 1]; NaN becomes 0.0 because json.dumps would emit invalid JSON for it."""
    value = float(value)
    if value >= 1.0:
        return 1.0
    return value if value > 0.0 else 0.0


def _sendable(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="replace").decode()
    return text


class AlibabaCodec:
    """Protocol state of one Alibaba NLS connection.

    Client side: waiting -> started (StartTranscription) -> stopping (StopTranscription).
    Server side: ``TranscriptionStarted`` once, result events, then ``TranscriptionCompleted``
    (only after a stop) or ``TaskFailed`` (any time) close the codec; nothing is accepted or
    rendered after that.
    """

    def __init__(self, *, max_text_bytes: int = 65536) -> None:
        self._max_text_bytes = max_text_bytes
        self._state = _State.WAITING
        self._task_id = ""
        self._params: SessionParams | None = None
        self._started_sent = False

    @property
    def task_id(self) -> str:
        """The client's task id; "" until a command with a well-formed header arrived."""
        return self._task_id

    @property
    def params(self) -> SessionParams | None:
        """Parameters of StartTranscription with every accepted control change applied."""
        return self._params

    @property
    def closed(self) -> bool:
        """True once TranscriptionCompleted or TaskFailed was rendered."""
        return self._state is _State.CLOSED

    # --- receiving ------------------------------------------------------------------------

    def receive_binary(self, data: bytes) -> AudioReceived:
        if self._state is not _State.STARTED:
            raise InvalidMessage(f"audio received while {self._state.value}")
        return AudioReceived(data)

    def receive_text(self, text: str) -> ClientCommand:
        message = self._parse(text)
        header = message.get("header")
        if not isinstance(header, dict):
            raise InvalidMessage("header must be a JSON object")
        namespace = header.get("namespace")
        name = header.get("name")
        appkey = header.get("appkey")
        if appkey is None:
            appkey = ""
        if not isinstance(namespace, str):
            raise InvalidMessage(f"header.namespace must be a string, got {_show(namespace)}")
        if not isinstance(name, str):
            raise InvalidMessage(f"header.name must be a string, got {_show(name)}")
        if not isinstance(appkey, str):
            raise InvalidMessage(f"header.appkey must be a string, got {_show(appkey)}")
        if len(appkey) > MAX_APPKEY_CHARS:
            raise InvalidMessage(f"header.appkey is longer than {MAX_APPKEY_CHARS} characters")
        message_id = header.get("message_id")
        if not (isinstance(message_id, str) and _HEX32.fullmatch(message_id)):
            raise InvalidMessage(
                f"header.message_id must be 32 hexadecimal characters, got {_show(message_id)}"
            )
        task_id = header.get("task_id")
        if not (isinstance(task_id, str) and _HEX32.fullmatch(task_id)):
            raise InvalidMessage(
                f"header.task_id must be 32 hexadecimal characters, got {_show(task_id)}"
            )
        if not self._task_id:
            self._task_id = task_id  # so that a TaskFailed for this very message can echo it
        elif task_id != self._task_id:
            raise InvalidMessage(
                f"header.task_id {task_id} differs from the session's {self._task_id}"
            )
        if namespace != NAMESPACE:
            raise UnknownNamespace(f"unknown namespace {_show(namespace)}, expected {NAMESPACE}")
        if self._state is _State.CLOSED:
            raise InvalidMessage("message received after the task ended")

        if name == START:
            return self._start(task_id, appkey, message.get("payload"))
        if name == STOP:
            return self._stop()
        if name in CONTROL_NAMES:
            return self._control(name, message.get("payload"))
        raise InvalidDirective(f"unknown directive {_show(name)} in namespace {NAMESPACE}")

    def _parse(self, text: str) -> dict[str, object]:
        limit = self._max_text_bytes
        if len(text) > limit or (
            len(text) * 4 > limit and len(text.encode(errors="surrogatepass")) > limit
        ):
            raise InvalidMessage(f"text frame larger than {limit} bytes")
        try:
            message = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise InvalidMessage("text frame is not valid JSON") from None
        if not isinstance(message, dict):
            raise InvalidMessage("text frame must hold a JSON object")
        return message

    def _start(self, task_id: str, appkey: str, payload: object) -> StartRequested:
        if self._state is not _State.WAITING:
            raise InvalidMessage(f"{START} received twice")
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise InvalidMessage(f"{START} payload must be a JSON object")
        params = _start_params(payload)
        self._params = params
        self._state = _State.STARTED
        return StartRequested(task_id=task_id, appkey=appkey, params=params)

    def _stop(self) -> StopRequested:
        if self._state is _State.WAITING:
            raise InvalidMessage(f"{STOP} before {START}")
        if self._state is _State.STOPPING:
            raise AlreadyStopping(f"{STOP} received while already stopping")
        self._state = _State.STOPPING
        return StopRequested()

    def _control(self, name: str, payload: object) -> ControlRequested:
        if self._state is _State.WAITING:
            raise InvalidMessage(f"{name} before {START}")
        if self._state is not _State.STARTED:
            return ControlRequested({})  # the audio is over: nothing left to apply it to
        changes = _control_changes(payload)
        if changes and self._params is not None:
            self._params = self._params.model_copy(update=changes)
        return ControlRequested(changes)

    # --- rendering (hot path: called for every partial result) -----------------------------

    def render(self, event: ServerEvent) -> str:
        """Encode ``event`` as a JSON text frame; raise LocalProtocolError if not allowed now."""
        state = self._state
        if state is _State.CLOSED:
            raise LocalProtocolError(f"cannot send {type(event).__name__}: the task has ended")
        if isinstance(event, TaskFailed):
            self._state = _State.CLOSED
            return _DUMPS(
                {
                    "header": {
                        "namespace": FAILED_NAMESPACE,
                        "name": "TaskFailed",
                        "status": int(event.code),
                        "message_id": uuid.uuid4().hex,
                        "task_id": self._task_id,
                        "status_text": _sendable(event.reason),
                    }
                }
            )
        params = self._params
        if state is _State.WAITING or params is None:
            raise LocalProtocolError(f"cannot send {type(event).__name__} before {START}")
        if isinstance(event, TranscriptionStarted):
            if self._started_sent:
                raise LocalProtocolError("TranscriptionStarted was already sent")
            self._started_sent = True
            return self._frame(
                "TranscriptionStarted", {"session_id": params.session_id or event.session_id}
            )
        if not self._started_sent:
            raise LocalProtocolError(
                f"cannot send {type(event).__name__} before TranscriptionStarted"
            )
        payload: dict[str, object]
        if isinstance(event, ResultChanged):
            payload = {
                "index": int(event.index),
                "time": int(event.time_ms),
                "result": event.text,
                "status": SUCCESS,
            }
            if params.enable_words:
                payload["words"] = _words(event.words)
            if event.confidence is not None:
                payload["confidence"] = _unit(event.confidence)
            return self._frame("TranscriptionResultChanged", payload)
        if isinstance(event, SentenceBegin):
            return self._frame(
                "SentenceBegin", {"index": int(event.index), "time": int(event.time_ms)}
            )
        if isinstance(event, SentenceEnd):
            time_ms = int(event.time_ms)
            payload = {
                "index": int(event.index),
                "time": time_ms,
                "begin_time": int(event.begin_time_ms),
                "result": event.text,
                "confidence": _unit(event.confidence),
                "status": SENTENCE_TIMEOUT if event.timed_out else SUCCESS,
            }
            if params.enable_words:
                payload["words"] = _words(event.words)
            if params.enable_semantic_sentence_detection:
                payload["stash_result"] = {
                    "sentenceId": int(event.index) + 1,
                    "beginTime": time_ms,
                    "text": "",
                    "currentTime": time_ms,
                }
            return self._frame("SentenceEnd", payload)
        if isinstance(event, TranscriptionCompleted):
            if state is not _State.STOPPING:
                raise LocalProtocolError(f"cannot send TranscriptionCompleted before {STOP}")
            self._state = _State.CLOSED
            return self._frame("TranscriptionCompleted", None)
        raise LocalProtocolError(f"not a server event: {event!r}")  # pragma: no cover

    def _frame(self, name: str, payload: dict[str, object] | None) -> str:
        header = {
            "namespace": NAMESPACE,
            "name": name,
            "status": SUCCESS,
            "message_id": uuid.uuid4().hex,
            "task_id": self._task_id,
            "status_text": STATUS_TEXT,
        }
        if payload is None:  # TranscriptionCompleted: header only, like the real service
            return _DUMPS({"header": header})
        return _DUMPS({"header": header, "payload": payload})


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")
