"""Hostile clients against the live gateway: random and malformed frames, and the size limits.

Each bad session must end with its own status code (protocols.md §1.7 and the README's table),
or, for a frame beyond the transport's limit, with a close; meanwhile a good session streaming
a real recording gets exactly the transcript it gets alone, and the gateway logs no error.
The codec alone is fuzzed in tests/test_dialect_alibaba.py; here the frames go through the
real stack (trio-websocket, the session's tasks, NATS, pocketsphinx workers).

Hypothesis runs in a worker thread and plays each example on the test's trio loop
(``trio.from_thread.run``), so one gateway and one good session span every example.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import string
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asrd.client import open_transcription, pcm_chunks
from asrd.config import ServerConfig
from tests.audio_fixtures import load_clip, silence
from tests.conftest import Nats, Pool, RunningGateway, open_gateway

pytestmark = pytest.mark.integration

GUARD_S = 120  # a hang guard, not a speed threshold
MAX_FRAME = 4096  # [server] max_frame_bytes of the gateway under attack
MAX_TEXT = 2048  # [server] max_text_bytes
TRANSPORT_LIMIT = 4 * max(MAX_FRAME, MAX_TEXT)  # trio-websocket closes beyond it (1009)
# A loaded machine may delay a worker's claim reply or heartbeat by seconds: that must not
# turn into 50000000 here (those paths have their own tests).
PATIENT: dict[str, Any] = {"claim_timeout_s": 30.0, "worker_timeout_s": 10.0}
LIMITS: dict[str, Any] = {"max_frame_bytes": MAX_FRAME, "max_text_bytes": MAX_TEXT, **PATIENT}
EXAMPLES_PER_KIND = 6
FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)

TASK = "5ca1ab1e" * 4  # the task id of every hostile session
KNOWN_NAMES = (
    "StartTranscription",
    "StopTranscription",
    "ControlTranscriber",
    "ControlTranscription",
)

# Status codes (protocols.md §1.7)
CLIENT_ERROR = 40000000
INVALID_MESSAGE = 40000002
INVALID_PARAMETER = 40000003
TOO_MANY = 40000005
BAD_WAV = 40000009
UNKNOWN_NAMESPACE = 40010001
INVALID_DIRECTIVE = 40010003
ALREADY_STOPPING = 40010005
UNSUPPORTED_RATE = 41010101


# --- sessions and what the server must answer --------------------------------------------------


class AwaitStarted:
    """A step of a session: wait for ``TranscriptionStarted`` before sending on."""

    def __repr__(self) -> str:
        return "<await TranscriptionStarted>"


STARTED = AwaitStarted()
Frame = str | bytes | AwaitStarted


@dataclass(frozen=True)
class Expect:
    kind: str  # "failed" (TaskFailed with code), "completed", "closed" (no TaskFailed)
    code: int = 0


def failed(code: int) -> Expect:
    return Expect("failed", code)


COMPLETED = Expect("completed")
CLOSED = Expect("closed")


@dataclass(frozen=True)
class Case:
    what: str
    frames: tuple[Frame, ...]
    expect: Expect

    def __repr__(self) -> str:  # hypothesis prints failing cases: keep big frames short
        shown = [
            f if isinstance(f, AwaitStarted) or len(f) < 120 else _short(f) for f in self.frames
        ]
        return f"Case({self.what!r}, {shown!r}, {self.expect})"


def _short(frame: str | bytes) -> str:
    return f"<{type(frame).__name__} of {len(frame)}: {frame[:40]!r}...>"


@dataclass
class Observed:
    names: list[str] = field(default_factory=list)
    failed: dict[str, Any] | None = None  # the TaskFailed header
    close_code: int | None = None


def header(name: str, /, **override: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "message_id": random_hex(),
        "task_id": TASK,
        "namespace": "SpeechTranscriber",
        "name": name,
        "appkey": "default",
    }
    fields.update(override)
    return fields


def command(name: str, payload: object = None, /, **hdr: object) -> str:
    """A command with header fields overridden by ``hdr``; no ``payload`` key when None."""
    message: dict[str, object] = {"header": header(name, **hdr)}
    if payload is not None:
        message["payload"] = payload
    return json.dumps(message)


def random_hex() -> str:
    return uuid.uuid4().hex


def start(**payload: object) -> str:
    return command("StartTranscription", {"format": "pcm", "sample_rate": 16000, **payload})


STOP = command("StopTranscription")
OPENING: dict[str, tuple[Frame, ...]] = {"fresh": (), "started": (start(), STARTED)}


async def play(url: str, frames: Sequence[Frame]) -> Observed:
    """Send ``frames``; read until TaskFailed, TranscriptionCompleted or the close."""
    seen = Observed()

    def record(message: str | bytes) -> str:
        event = json.loads(message)
        name: str = event["header"]["name"]
        seen.names.append(name)
        if name == "TaskFailed":
            seen.failed = event["header"]
        return name

    with trio.fail_after(GUARD_S):
        async with trio_websocket.open_websocket_url(
            url, extra_headers=[(b"X-NLS-Token", b"t")], max_message_size=1 << 20
        ) as ws:
            try:
                for frame in frames:
                    if isinstance(frame, AwaitStarted):
                        if record(await ws.get_message()) != "TranscriptionStarted":
                            return seen
                    else:
                        await ws.send_message(frame)
            except trio_websocket.ConnectionClosed:
                pass  # the server gave up on us: read what it said before closing
            try:
                while record(await ws.get_message()) not in (
                    "TaskFailed",
                    "TranscriptionCompleted",
                ):
                    pass
            except trio_websocket.ConnectionClosed as exc:
                seen.close_code = exc.reason.code if exc.reason else None
    return seen


def check(case: Case, seen: Observed) -> None:
    expect = case.expect
    if expect.kind == "failed":
        assert seen.failed is not None, (case, seen)
        assert seen.names[-1] == "TaskFailed", seen.names
        assert (seen.failed["status"], seen.failed["namespace"]) == (expect.code, "Default"), (
            case,
            seen,
        )
        assert isinstance(seen.failed["status_text"], str) and seen.failed["status_text"]
        assert not {"TaskFailed", "TranscriptionCompleted"} & set(seen.names[:-1]), seen.names
    elif expect.kind == "completed":
        assert seen.names and seen.names[0] == "TranscriptionStarted", (case, seen)
        assert seen.names[-1] == "TranscriptionCompleted", (case, seen)
        assert "TaskFailed" not in seen.names
    else:
        assert seen.failed is None, (case, seen)
        # 1009 "message too big"; 1006 when the rest of our frame arrived after the server
        # had closed and the kernel reset the connection before its close frame reached us.
        assert seen.close_code in (1009, 1006), (case, seen)


# --- strategies -----------------------------------------------------------------------------


def seeded_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def garbage(min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    return st.builds(seeded_bytes, st.integers(min_size, max_size), st.integers(0, 2**32))


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
not_null = json_values.filter(lambda v: v is not None)
not_str = json_values.filter(lambda v: not isinstance(v, str) and v is not None)
containers = st.lists(scalars, max_size=3) | st.dictionaries(
    st.text(max_size=5), scalars, max_size=3
)
letters = st.text(alphabet=string.ascii_letters, min_size=1, max_size=12)
states = st.sampled_from(sorted(OPENING))


def valid_command_text() -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            start(enable_words=True, max_sentence_silence=500),
            STOP,
            command("ControlTranscriber", {"max_sentence_silence": 400}),
        ]
    )


def is_command_object(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("header"), dict)


@st.composite
def garbage_text(draw: st.DrawFn) -> Case:
    text = draw(st.text(max_size=300).filter(lambda t: not is_command_object(t)))
    state = draw(states)
    return Case("text that is no command", (*OPENING[state], text), failed(INVALID_MESSAGE))


@st.composite
def truncated_json(draw: st.DrawFn) -> Case:
    text = draw(valid_command_text())
    cut = draw(st.integers(0, len(text) - 1))
    state = draw(states)
    return Case("truncated JSON", (*OPENING[state], text[:cut]), failed(INVALID_MESSAGE))


@st.composite
def not_a_command_object(draw: st.DrawFn) -> Case:
    value = draw(
        json_values.filter(lambda v: not isinstance(v, dict))
        | st.builds(lambda h: {"header": h}, not_null.filter(lambda v: not isinstance(v, dict)))
        | st.builds(lambda p: {"payload": p}, json_values)
    )
    state = draw(states)
    return Case(
        "JSON but not a command", (*OPENING[state], json.dumps(value)), failed(INVALID_MESSAGE)
    )


@st.composite
def wrong_header_type(draw: st.DrawFn) -> Case:
    key = draw(st.sampled_from(["namespace", "name", "message_id", "task_id", "appkey"]))
    value = draw(not_str)  # an appkey of null means "none given": not wrong
    name = draw(st.sampled_from(KNOWN_NAMES))
    state = draw(states)
    frame = command(name, {}, **{key: value})
    return Case(f"header.{key} of a wrong type", (*OPENING[state], frame), failed(INVALID_MESSAGE))


@st.composite
def malformed_ids(draw: st.DrawFn) -> Case:
    key = draw(st.sampled_from(["message_id", "task_id"]))
    value = draw(
        st.text(max_size=40).filter(
            lambda s: not (len(s) == 32 and all(c in string.hexdigits for c in s))
        )
    )
    state = draw(states)
    frame = command(draw(st.sampled_from(KNOWN_NAMES)), {}, **{key: value})
    return Case(f"malformed header.{key}", (*OPENING[state], frame), failed(INVALID_MESSAGE))


@st.composite
def unknown_namespace(draw: st.DrawFn) -> Case:
    namespace = draw(st.text(max_size=30).filter(lambda s: s != "SpeechTranscriber"))
    state = draw(states)
    frame = command(draw(st.sampled_from(KNOWN_NAMES)), {}, namespace=namespace)
    return Case("unknown namespace", (*OPENING[state], frame), failed(UNKNOWN_NAMESPACE))


@st.composite
def unknown_directive(draw: st.DrawFn) -> Case:
    name = draw(st.text(max_size=30).filter(lambda s: s not in KNOWN_NAMES))
    state = draw(states)
    return Case(
        "unknown directive", (*OPENING[state], command(name, {})), failed(INVALID_DIRECTIVE)
    )


@st.composite
def oversize_text(draw: st.DrawFn) -> Case:
    """Over max_text_bytes but within the transport limit: counted in characters or bytes."""
    if draw(st.booleans()):
        text = draw(st.sampled_from("{a ")) * draw(st.integers(MAX_TEXT + 1, TRANSPORT_LIMIT))
    else:  # few enough characters, too many UTF-8 bytes
        char = draw(st.sampled_from(["é", "中", "😀"]))
        count = draw(st.integers(MAX_TEXT // len(char.encode()) + 1, MAX_TEXT))
        text = char * count
    state = draw(states)
    return Case("text frame over max_text_bytes", (*OPENING[state], text), failed(INVALID_MESSAGE))


@st.composite
def oversize_audio(draw: st.DrawFn) -> Case:
    frame = draw(garbage(MAX_FRAME + 1, TRANSPORT_LIMIT))
    state = draw(states)
    return Case("audio frame over max_frame_bytes", (*OPENING[state], frame), failed(CLIENT_ERROR))


@st.composite
def beyond_transport_limit(draw: st.DrawFn) -> Case:
    size = draw(st.integers(TRANSPORT_LIMIT + 1, 4 * TRANSPORT_LIMIT))
    frame: str | bytes = "x" * size if draw(st.booleans()) else b"\x01" * size
    state = draw(states)
    return Case("frame beyond the transport limit", (*OPENING[state], frame), CLOSED)


@st.composite
def audio_before_start(draw: st.DrawFn) -> Case:
    return Case("audio before Start", (draw(garbage(0, MAX_FRAME)),), failed(INVALID_MESSAGE))


@st.composite
def command_before_start(draw: st.DrawFn) -> Case:
    name = draw(st.sampled_from(KNOWN_NAMES[1:]))
    payload = draw(st.none() | st.dictionaries(st.text(max_size=8), scalars, max_size=3))
    return Case(f"{name} before Start", (command(name, payload),), failed(INVALID_MESSAGE))


@st.composite
def start_payload_not_an_object(draw: st.DrawFn) -> Case:
    payload = draw(not_null.filter(lambda v: not isinstance(v, dict)))
    frame = command("StartTranscription", payload)
    return Case("Start payload not an object", (frame,), failed(INVALID_MESSAGE))


BOOL_KEYS = (
    "enable_intermediate_result",
    "enable_punctuation_prediction",
    "enable_inverse_text_normalization",
    "enable_words",
    "enable_semantic_sentence_detection",
    "disfluency",
    "enable_ignore_sentence_timeout",
)
STRING_KEYS = ("language", "vocabulary_id", "customization_id", "session_id")


def wrong_values(key: str) -> st.SearchStrategy[object]:
    """Values of ``key`` that StartTranscription must refuse with 40000003."""
    if key in BOOL_KEYS:
        return (
            st.integers().filter(lambda i: i not in (0, 1))
            | st.floats(allow_nan=False, allow_infinity=False)
            | letters.filter(lambda s: s.lower() not in ("true", "false"))
            | containers
        )
    if key == "max_sentence_silence":
        return (
            st.integers(max_value=199)
            | st.integers(min_value=6001)
            | st.floats(200, 6000).map(lambda x: int(x) + 0.5)
            | letters
            | st.booleans()
            | containers
        )
    if key == "speech_noise_threshold":
        finite = st.floats(allow_nan=False, allow_infinity=False)
        return finite.filter(lambda x: abs(x) > 1) | letters | st.booleans() | containers
    if key == "format":
        return letters.filter(lambda s: s.lower() not in ("pcm", "wav")) | not_str
    if key == "sample_rate":
        return st.floats(1, 1e6).map(lambda x: int(x) + 0.25) | letters | st.booleans() | containers
    if key in STRING_KEYS:
        return not_str
    assert key == "special_word_filter"
    too_many = st.lists(letters, min_size=33, max_size=40).map(
        lambda words: {"filter_with_empty": {"word_list": words}}
    )
    return (
        st.integers()
        | st.booleans()
        | st.lists(scalars, max_size=3)
        | letters.filter(lambda s: s != "null")
        | too_many
    )


@st.composite
def invalid_parameter(draw: st.DrawFn) -> Case:
    keys = (*BOOL_KEYS, *STRING_KEYS, "max_sentence_silence", "speech_noise_threshold")
    key = draw(st.sampled_from((*keys, "format", "sample_rate", "special_word_filter")))
    value = draw(wrong_values(key))
    frame = command("StartTranscription", {key: value})
    return Case(f"invalid {key}", (frame,), failed(INVALID_PARAMETER))


@st.composite
def unsupported_sample_rate(draw: st.DrawFn) -> Case:
    rate = draw(
        st.integers(-(10**30), 10**30).filter(lambda r: r not in (8000, 16000))
        | st.sampled_from([44100.0, 1e20, 1e300, -8000.0])
        | st.integers(0, 10**12 - 1).filter(lambda r: r not in (8000, 16000)).map(str)
    )
    frame = command("StartTranscription", {"sample_rate": rate})
    return Case("unsupported sample rate", (frame,), failed(UNSUPPORTED_RATE))


@st.composite
def start_twice(draw: st.DrawFn) -> Case:
    again = draw(st.sampled_from([start(), start(sample_rate=8000), command("StartTranscription")]))
    other_task = command("StopTranscription", task_id=random_hex())
    frame = draw(st.sampled_from([again, other_task]))
    return Case(
        "Start twice, or another task id", (*OPENING["started"], frame), failed(INVALID_MESSAGE)
    )


def wav_header(rate: int, *, channels: int = 1, bits: int = 16) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
    return b"RIFF\xff\xff\xff\xffWAVEfmt " + struct.pack("<I", 16) + fmt + b"data\xff\xff\xff\xff"


@st.composite
def bad_wav(draw: st.DrawFn) -> Case:
    opening = (start(format="wav"), STARTED)
    kind = draw(st.sampled_from(["garbage", "rate", "shape"]))
    if kind == "garbage":
        frame = draw(garbage(1, MAX_FRAME).filter(lambda b: b[:1] != b"R"))
        return Case("WAV without a RIFF header", (*opening, frame), failed(BAD_WAV))
    if kind == "rate":  # a huge (or any other) declared rate in the header
        rate = draw(st.integers(1, 2**32 - 1).filter(lambda r: r != 16000))
        return Case("WAV header rate", (*opening, wav_header(rate)), failed(UNSUPPORTED_RATE))
    channels, bits = draw(st.sampled_from([(2, 16), (1, 8), (1, 24), (6, 32)]))
    frame = wav_header(16000, channels=channels, bits=bits)
    return Case("WAV header not mono 16-bit", (*opening, frame), failed(BAD_WAV))


@st.composite
def tolerated_junk(draw: st.DrawFn) -> Case:
    """What the protocol says to tolerate: unknown keys, junk controls, odd audio frames."""
    extra = draw(
        st.dictionaries(
            st.text(min_size=1, max_size=10).map(lambda k: "x_" + k), json_values, max_size=4
        )
    )
    frames: list[Frame] = [start(**extra), STARTED]
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            frames.append(draw(garbage(0, MAX_FRAME)))  # any bytes are PCM
        else:
            name = draw(st.sampled_from(["ControlTranscriber", "ControlTranscription"]))
            frames.append(command(name, draw(json_values)))
    frames.append(STOP)
    return Case("tolerated junk", tuple(frames), COMPLETED)


KINDS: dict[str, st.SearchStrategy[Case]] = {
    "garbage text": garbage_text(),
    "truncated JSON": truncated_json(),
    "not a command object": not_a_command_object(),
    "wrong header types": wrong_header_type(),
    "malformed ids": malformed_ids(),
    "unknown namespace": unknown_namespace(),
    "unknown directive": unknown_directive(),
    "oversize text": oversize_text(),
    "oversize audio": oversize_audio(),
    "beyond the transport limit": beyond_transport_limit(),
    "audio before Start": audio_before_start(),
    "commands before Start": command_before_start(),
    "Start payload not an object": start_payload_not_an_object(),
    "invalid parameters": invalid_parameter(),
    "unsupported sample rates": unsupported_sample_rate(),
    "Start twice": start_twice(),
    "bad WAV": bad_wav(),
    "tolerated junk": tolerated_junk(),
}


# --- the good session and the gateway's log ----------------------------------------------------


GOOD_CLIP = "0880"


def good_pcm() -> bytes:
    return silence(300, 16000) + load_clip(GOOD_CLIP) + silence(1000, 16000)


async def transcript(url: str, pcm: bytes, *, realtime: bool = False) -> str:
    texts = []
    with trio.fail_after(GUARD_S):
        async with open_transcription(
            url, pcm_chunks(pcm), 16000, token="t", appkey="default", realtime=realtime
        ) as tr:
            async for event in tr:
                if event["header"]["name"] == "SentenceEnd":
                    texts.append(event["payload"]["result"])
    return " ".join(t for t in texts if t)


@contextmanager
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The gateway logs nothing at ERROR (no 'internal error', no traceback) meanwhile."""
    caplog.set_level(logging.WARNING, logger="asrd")
    yield
    errors = [
        r
        for r in caplog.records
        if r.name.startswith("asrd") and (r.levelno >= logging.ERROR or r.exc_info)
    ]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


async def while_a_good_session_streams(
    gw: RunningGateway, attack: Callable[[], Any], *, sync: bool
) -> None:
    """Run ``attack`` while good sessions stream; each must get the solo transcript."""
    pcm = good_pcm()
    solo = await transcript(gw.url, pcm)
    assert solo
    texts: list[str] = []
    attack_done = trio.Event()

    async def good() -> None:
        while not attack_done.is_set() or not texts:
            texts.append(await transcript(gw.url, pcm, realtime=True))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(good)
        if sync:
            await trio.to_thread.run_sync(attack)
        else:
            await attack()
        attack_done.set()
    assert texts and all(t == solo for t in texts), (solo, texts)


# --- the tests ---------------------------------------------------------------------------------


async def test_fuzzed_sessions_end_with_their_codes_and_spare_a_good_one(
    nats: Nats, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    with no_errors_logged(caplog):
        async with open_gateway(nats.url, pool, server=LIMITS) as gw:
            played: dict[str, int] = {}

            def attack() -> None:
                for kind, strategy in KINDS.items():

                    @settings(FUZZ_SETTINGS, max_examples=EXAMPLES_PER_KIND)
                    @given(strategy)
                    def one(case: Case) -> None:
                        seen = trio.from_thread.run(play, gw.url, case.frames)
                        check(case, seen)
                        played[kind] = played.get(kind, 0) + 1  # noqa: B023 - runs now

                    one()

            await while_a_good_session_streams(gw, attack, sync=True)
            assert set(played) == set(KINDS)
            outcomes = gw.gateway.state.outcomes
            for code in (CLIENT_ERROR, INVALID_MESSAGE, INVALID_PARAMETER, UNSUPPORTED_RATE):
                assert outcomes.get(code), (code, outcomes)


async def test_raw_garbage_only_closes_that_connection(
    nats: Nats, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that are no HTTP request, or no WebSocket framing after the upgrade."""
    with no_errors_logged(caplog):
        async with open_gateway(nats.url, pool, server=LIMITS) as gw:

            async def upgraded() -> trio.SocketStream:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(
                    b"GET /ws/v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\nX-NLS-Token: t\r\n\r\n"
                )
                response = b""
                while b"\r\n\r\n" not in response:
                    chunk = await stream.receive_some(4096)
                    assert chunk, response
                    response += chunk
                assert response.startswith(b"HTTP/1.1 101"), response
                return stream

            async def one(data: bytes, upgrade: bool) -> bytes:
                """Send ``data`` and EOF; return what the server sent until it closed."""
                received = b""
                with trio.fail_after(GUARD_S):
                    if upgrade:
                        stream = await upgraded()
                    else:
                        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                    async with stream:
                        try:
                            await stream.send_all(data)
                            await stream.send_eof()
                            while chunk := await stream.receive_some(65536):
                                received += chunk
                        except trio.BrokenResourceError:
                            pass  # reset by the server: closed too
                return received

            @settings(FUZZ_SETTINGS, max_examples=40)
            @given(
                garbage(1, 3 * MAX_FRAME)
                | st.builds(  # an unmasked (server-style) text frame
                    lambda t: bytes([0x81, len(t)]) + t, st.binary(max_size=125)
                ),
                st.booleans(),
            )
            def attack(data: bytes, upgrade: bool) -> None:
                received = trio.from_thread.run(one, data, upgrade)
                if not upgrade:  # an HTTP answer (400 for a bad head), or nothing
                    assert received == b"" or received.startswith(b"HTTP/1.1 "), received[:100]

            await while_a_good_session_streams(gw, attack, sync=True)


NAMED: dict[str, tuple[list[Frame], Expect]] = {
    "huge sample rate": (
        [command("StartTranscription", {"sample_rate": 10**30})],
        failed(UNSUPPORTED_RATE),
    ),
    "sample rate 0": (
        [command("StartTranscription", {"sample_rate": 0})],
        failed(UNSUPPORTED_RATE),
    ),
    "Start twice": ([start(), STARTED, start()], failed(INVALID_MESSAGE)),
    "Stop before Start": ([STOP], failed(INVALID_MESSAGE)),
    "truncated JSON": ([start()[:-7]], failed(INVALID_MESSAGE)),
    "binary garbage before Start": ([seeded_bytes(3000, 1)], failed(INVALID_MESSAGE)),
    "wrong type in header": (
        [command("StartTranscription", {}, namespace=7)],
        failed(INVALID_MESSAGE),
    ),
    "wrong type in payload": (
        [command("StartTranscription", {"enable_words": [1]})],
        failed(INVALID_PARAMETER),
    ),
    "text just over max_text_bytes": ([start(pad="x" * MAX_TEXT)], failed(INVALID_MESSAGE)),
    "audio just over max_frame_bytes": (
        [start(), STARTED, bytes(MAX_FRAME + 2)],
        failed(CLIENT_ERROR),
    ),
    "text way over": (["{" * (TRANSPORT_LIMIT + 1)], CLOSED),
    "audio way over": ([start(), STARTED, bytes(10 * TRANSPORT_LIMIT)], CLOSED),
}


def stop_twice_frames() -> list[Frame]:
    """Stop twice while the first Stop still waits for the final result of real speech."""
    speech = load_clip("0930")[: 2 * 16000 * 2]  # two seconds of speech
    frames: list[Frame] = [start(), STARTED]
    frames += [speech[i : i + 3200] for i in range(0, len(speech), 3200)]
    return [*frames, STOP, STOP]


async def test_named_hostile_sessions_get_their_codes(
    nats: Nats, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    cases = [Case(what, tuple(frames), expect) for what, (frames, expect) in NAMED.items()]
    cases.append(Case("Stop twice", tuple(stop_twice_frames()), failed(ALREADY_STOPPING)))
    with no_errors_logged(caplog):
        async with open_gateway(nats.url, pool, server=LIMITS) as gw:

            async def attack() -> None:
                for case in cases:
                    check(case, await play(gw.url, case.frames))

            await while_a_good_session_streams(gw, attack, sync=False)


async def test_json_bombs_within_the_default_text_limit(
    nats: Nats, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """Deep nesting (RecursionError inside json) and huge numbers, under 64 KiB each."""
    deep = 30_000  # levels: far beyond the interpreter's recursion limit
    cases = [
        Case("deeply nested JSON", ("[" * deep + "]" * deep,), failed(INVALID_MESSAGE)),
        Case(
            "deeply nested word filter",
            (command("StartTranscription", {"special_word_filter": "[" * deep + "]" * deep}),),
            failed(INVALID_PARAMETER),
        ),
        Case(  # Python refuses to parse integers of more than 4300 digits
            "a 5000-digit sample rate",
            (start()[:-2] + ', "sample_rate": ' + "9" * 5000 + "}}",),
            failed(INVALID_MESSAGE),
        ),
        Case(
            "an infinite sample rate",
            (start()[:-2] + ', "sample_rate": 1e400}}',),
            failed(INVALID_PARAMETER),
        ),
    ]
    with no_errors_logged(caplog):
        async with open_gateway(nats.url, pool, server=PATIENT) as gw:
            for case in cases:
                assert all(
                    len(f) < ServerConfig().max_text_bytes
                    for f in case.frames
                    if not isinstance(f, AwaitStarted)
                )
                check(case, await play(gw.url, case.frames))


async def test_max_sessions_per_gateway(
    nats: Nats, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    with no_errors_logged(caplog):
        async with open_gateway(nats.url, pool, server={"max_sessions": 2, **PATIENT}) as gw:
            async with (
                trio_websocket.open_websocket_url(gw.url) as first,
                trio_websocket.open_websocket_url(gw.url) as second,
            ):
                for ws in (first, second):
                    await ws.send_message(start())
                    with trio.fail_after(GUARD_S):
                        reply = json.loads(await ws.get_message())
                    assert reply["header"]["name"] == "TranscriptionStarted"
                check(
                    Case("third session", (start(),), failed(TOO_MANY)),
                    await play(gw.url, [start()]),
                )
            # both hung up: once their sessions ended, the slots are free again
            with trio.fail_after(GUARD_S):
                if gw.gateway.state.active:
                    await gw.gateway.state.idle.wait()
            check(
                Case("after hang-up", (start(), STARTED, STOP), COMPLETED),
                await play(gw.url, [start(), STARTED, STOP]),
            )


async def test_an_unknown_path_gets_task_failed_not_an_http_error(
    nats: Nats, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """An SDK pointed at a wrong path learns why in on_error: 40010001 after the upgrade."""
    with no_errors_logged(caplog):
        async with open_gateway(nats.url, pool, server=PATIENT) as gw:
            url = gw.url.replace("/ws/v1", "/ws/v2") + "?token=t"
            with trio.fail_after(GUARD_S):
                async with trio_websocket.open_websocket_url(url) as ws:
                    header = json.loads(await ws.get_message())["header"]
                    with pytest.raises(trio_websocket.ConnectionClosed):
                        await ws.get_message()
            assert (header["namespace"], header["name"]) == ("Default", "TaskFailed")
            assert header["status"] == UNKNOWN_NAMESPACE
            assert "unknown path '/ws/v2'" in header["status_text"]
            assert gw.gateway.state.outcomes == {UNKNOWN_NAMESPACE: 1}
            check(  # the right path still serves
                Case("after it", (start(), STARTED, STOP), COMPLETED),
                await play(gw.url, [start(), STARTED, STOP]),
            )


UPGRADE = (
    b"GET /ws/v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)
BAD_UPGRADES: dict[str, tuple[bytes, bytes, bytes]] = {  # request, status line, reason
    "POST": (
        UPGRADE.replace(b"GET", b"POST", 1) + b"\r\n",
        b"HTTP/1.1 400 ",
        b"a WebSocket upgrade must be GET, not POST",
    ),
    "no Connection": (
        UPGRADE.replace(b"Connection: Upgrade\r\n", b"") + b"\r\n",
        b"HTTP/1.1 400 ",
        b"missing header 'Connection: Upgrade'",
    ),
    "version 8": (
        UPGRADE.replace(b"Version: 13", b"Version: 8") + b"\r\n",
        b"HTTP/1.1 426 ",
        b"only WebSocket version 13 is supported",
    ),
    "no version": (
        UPGRADE.replace(b"Sec-WebSocket-Version: 13\r\n", b"") + b"\r\n",
        b"HTTP/1.1 400 ",
        b"only WebSocket version 13 is supported",
    ),
    "no key": (
        UPGRADE.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"") + b"\r\n",
        b"HTTP/1.1 400 ",
        b"missing header 'Sec-WebSocket-Key'",
    ),
    "no Host": (
        UPGRADE.replace(b"Host: 127.0.0.1\r\n", b"") + b"\r\n",
        b"HTTP/1.1 400 ",
        b"missing header 'Host'",
    ),
    "Host not ASCII": (
        UPGRADE.replace(b"Host: 127.0.0.1", b"Host: \xff") + b"\r\n",
        b"HTTP/1.1 400 ",
        b"malformed header 'Host'",
    ),
}


def connection_handlers() -> int:
    """Connection handlers (trio.serve_listeners' tasks) still running in this trio run."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, todo = 0, [root]
    while todo:
        task = todo.pop()
        count += task.coro.__qualname__ == "_run_handler"
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


async def exchange(port: int, request: bytes) -> bytes:
    """Send ``request``; what the server sent until it closed."""
    with trio.fail_after(GUARD_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        received = b""
        async with stream:
            await stream.send_all(request)
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await stream.receive_some(65536):
                    received += chunk
        return received


async def handlers_gone() -> None:
    with trio.fail_after(GUARD_S):
        while connection_handlers():  # noqa: ASYNC110 - tasks of this run, no event to wait on
            await trio.sleep(0.05)


async def test_a_refused_upgrade_is_answered_and_leaves_nothing_behind(
    nats: Nats, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """Each gets its status and reason, and its handler ends: trio-websocket, left to refuse
    such a request itself, never returned the connection, and the handler waited for good."""
    with no_errors_logged(caplog):
        async with open_gateway(nats.url, pool, server=PATIENT) as gw:
            for name, (request, status, reason) in BAD_UPGRADES.items():
                answer = await exchange(gw.port, request)
                assert answer.startswith(status) and reason in answer, (name, answer)
            assert b"Sec-WebSocket-Version: 13" in await exchange(
                gw.port, BAD_UPGRADES["version 8"][0]
            )
            await handlers_gone()
            check(  # a good upgrade still serves
                Case("after them", (start(), STARTED, STOP), COMPLETED),
                await play(gw.url, [start(), STARTED, STOP]),
            )


async def test_an_upgrade_refused_further_down_ends_its_handler_at_the_deadline(
    nats: Nats, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that passes the gateway's checks but that h11 refuses (a space in a header
    name): trio-websocket answers 400 and never returns the connection; the handshake's
    deadline ends the handler."""
    monkeypatch.setattr("asrd.gateway.HANDSHAKE_TIMEOUT_S", 0.5)
    async with open_gateway(nats.url, pool, server=PATIENT) as gw:
        answer = await exchange(gw.port, UPGRADE + b"Bad Name: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        await handlers_gone()


async def test_max_session_duration(
    nats: Nats, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    with no_errors_logged(caplog):
        async with open_gateway(nats.url, pool, server={"max_session_s": 1.0, **PATIENT}) as gw:
            began = trio.current_time()  # the session's clock starts after this
            with trio.fail_after(GUARD_S):
                async with trio_websocket.open_websocket_url(gw.url) as ws:
                    await ws.send_message(start())
                    assert json.loads(await ws.get_message())["header"]["name"] == (
                        "TranscriptionStarted"
                    )

                    async def stream_silence() -> None:
                        frame = bytes(3200)
                        try:
                            while True:
                                await ws.send_message(frame)
                                await trio.sleep(0.1)
                        except trio_websocket.ConnectionClosed:
                            return

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(stream_silence)
                        reply = json.loads(await ws.get_message())
                        nursery.cancel_scope.cancel()
            header = reply["header"]
            assert (header["name"], header["status"]) == ("TaskFailed", CLIENT_ERROR)
            assert "maximum duration" in header["status_text"]
            assert trio.current_time() - began >= 1.0  # not before its time


def test_limits_are_configurable_and_documented() -> None:
    root = Path(__file__).resolve().parent.parent
    config_toml = (root / "config.toml").read_text()
    readme = (root / "README.md").read_text()
    for key in ("max_frame_bytes", "max_text_bytes", "max_session_s", "max_sessions"):
        assert key in ServerConfig.model_fields
        line = next(line for line in config_toml.splitlines() if line.startswith(f"{key} "))
        assert "#" in line, line  # a comment says what it limits
        assert key in readme
