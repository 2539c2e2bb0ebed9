"""Tests of asrd.client and asrd.transcribe against a tiny fake NLS server defined here.

The fake speaks just enough of protocols.md §1: it checks the token header and the ids,
answers ``TranscriptionStarted``, one SentenceBegin/ResultChanged/SentenceEnd per second of
audio received, a last sentence for the rest on Stop, then ``TranscriptionCompleted``.
"""

from __future__ import annotations

import errno
import gc
import io
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import warnings
import wave
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from io import BytesIO, StringIO, TextIOWrapper
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws_events

from asrd.audio import to_pcm16_mono
from asrd.client import (
    LOCAL_FAILURE,
    TranscribeError,
    open_transcription,
    pcm_chunks,
    send_audio,
)
from asrd.resample import Resampler, resample
from asrd.transcribe import (
    AHEAD_CHUNKS,
    READ_BYTES,
    AudioInput,
    run_transcribe,
    transcribe_and_print,
    transcribe_input,
)
from asrd.wer import wer
from tests import audio_fixtures
from tests.audio_fixtures import load_clip, transcripts
from tests.conftest import RunningGateway
from tests.servers import read_until

Event = dict[str, Any]
HEX32 = re.compile(r"^[0-9a-f]{32}$")
TOKEN = "test-token"
APPKEY = "test-appkey"
GUARD = 30  # seconds: only against hangs, never a performance expectation


def server_event(
    name: str,
    task_id: str,
    payload: dict[str, object] | None = None,
    *,
    status: int = 20000000,
    status_text: str = "Gateway:SUCCESS:Success.",
) -> str:
    header = {
        "namespace": "Default" if name == "TaskFailed" else "SpeechTranscriber",
        "name": name,
        "status": status,
        "message_id": "0" * 32,
        "task_id": task_id,
        "status_text": status_text,
    }
    message: Event = {"header": header}
    if payload is not None:
        message["payload"] = payload
    return json.dumps(message)


@dataclass
class FakeServer:
    url: str = ""
    # behaviour, set by tests before connecting
    token: str = TOKEN
    fail_after_bytes: int | None = None
    fail_code: int = 40270002
    drop_after_bytes: int | None = None
    never_start: bool = False
    stall_after_start: bool = False  # answers Start, then reads nothing more
    hold_stop: threading.Event | None = None  # answers Stop once this is set
    stall_after_partial: bool = False  # sends the first sentence's partial result, then nothing
    text: str = "second"  # the words of each result
    # what it saw
    headers: dict[str, str] = field(default_factory=dict)
    start: Event | None = None
    stop: Event | None = None
    frame_sizes: list[int] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    client_closed: trio.Event | None = None

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        self.headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        self.client_closed = trio.Event()
        ws = await request.accept()
        try:
            await self._session(ws)
            await ws.get_message()  # the client must close on Completed
            self.violations.append("message after TranscriptionCompleted")
        except trio_websocket.ConnectionClosed:
            self.client_closed.set()

    async def _session(self, ws: trio_websocket.WebSocketConnection) -> None:
        start = json.loads(await ws.get_message())
        self.start = start
        header = start["header"]
        task_id = header["task_id"]
        if self.headers.get("x-nls-token") != self.token:
            await ws.send_message(
                server_event("TaskFailed", task_id, status=40000001, status_text="bad token")
            )
            await ws.aclose()
            return
        self.check_header(header, "StartTranscription")
        if self.never_start:
            await trio.sleep_forever()
        await ws.send_message(
            server_event("TranscriptionStarted", task_id, {"session_id": "5" * 32})
        )
        if self.stall_after_start:
            await trio.sleep_forever()
        second = 2 * int(start["payload"]["sample_rate"])
        received = sentences = 0

        async def sentence(end_ms: int) -> None:
            nonlocal sentences
            sentences += 1
            begin = (sentences - 1) * 1000
            await ws.send_message(
                server_event("SentenceBegin", task_id, {"index": sentences, "time": begin})
            )
            partial_result = {"index": sentences, "time": begin + 500, "result": self.text}
            await ws.send_message(
                server_event("TranscriptionResultChanged", task_id, partial_result)
            )
            if self.stall_after_partial:
                await trio.sleep_forever()
            final = {
                "index": sentences,
                "time": end_ms,
                "begin_time": begin,
                "result": f"{self.text} {sentences}",
                "confidence": 0.9,
                "status": 20000000,
            }
            await ws.send_message(server_event("SentenceEnd", task_id, final))

        while True:
            message = await ws.get_message()
            if isinstance(message, bytes):
                self.frame_sizes.append(len(message))
                received += len(message)
                while received >= (sentences + 1) * second:
                    await sentence((sentences + 1) * 1000)
                if self.fail_after_bytes is not None and received >= self.fail_after_bytes:
                    failed = server_event(
                        "TaskFailed", task_id, status=self.fail_code, status_text="no valid audio"
                    )
                    await ws.send_message(failed)
                    await ws.aclose()
                    return
                if self.drop_after_bytes is not None and received >= self.drop_after_bytes:
                    await ws.aclose(1011, "fake crash")
                    return
                continue
            stop = json.loads(message)
            self.stop = stop
            self.check_header(stop["header"], "StopTranscription")
            if stop["header"]["task_id"] != task_id:
                self.violations.append("task_id changed")
            if self.hold_stop is not None:
                await trio.to_thread.run_sync(self.hold_stop.wait)
            if received > sentences * second:
                await sentence(received * 1000 // second)
            await ws.send_message(server_event("TranscriptionCompleted", task_id))
            return

    def check_header(self, header: Event, name: str) -> None:
        if header.get("name") != name:
            self.violations.append(f"expected {name}, got {header.get('name')}")
        for key in ("message_id", "task_id"):
            if not HEX32.match(str(header.get(key))):
                self.violations.append(f"{key} is not 32 hex: {header.get(key)!r}")
        if header.get("namespace") != "SpeechTranscriber" or header.get("appkey") != APPKEY:
            self.violations.append(f"bad namespace or appkey: {header}")


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[FakeServer]:
    fake = FakeServer()
    ws_server = await nursery.start(
        partial(trio_websocket.serve_websocket, fake.handler, "127.0.0.1", 0, None)
    )
    fake.url = f"ws://127.0.0.1:{ws_server.port}/ws/v1"
    yield fake
    assert fake.violations == []


@contextmanager
def server_in_thread() -> Iterator[FakeServer]:
    """The fake in its own trio loop, for the synchronous ``run_transcribe``."""
    fake = FakeServer()
    ready = threading.Event()
    loop: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            ws_server = await nursery.start(
                partial(trio_websocket.serve_websocket, fake.handler, "127.0.0.1", 0, None)
            )
            fake.url = f"ws://127.0.0.1:{ws_server.port}/ws/v1"
            loop["token"] = trio.lowlevel.current_trio_token()
            loop["scope"] = nursery.cancel_scope
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,))
    thread.start()
    try:
        assert ready.wait(GUARD)
        yield fake
    finally:
        if "scope" in loop:
            trio.from_thread.run_sync(loop["scope"].cancel, trio_token=loop["token"])
        thread.join(GUARD)
    assert fake.violations == []


def silence(seconds: float, rate: int = 16000) -> bytes:
    return b"\x00\x00" * int(rate * seconds)


async def collect(url: str, pcm: bytes, **kwargs: Any) -> list[Event]:
    options: dict[str, Any] = {"token": TOKEN, "appkey": APPKEY, "realtime": False}
    options.update(kwargs)
    rate = options.pop("sample_rate", 16000)
    with trio.fail_after(GUARD):
        async with open_transcription(url, pcm_chunks(pcm), rate, **options) as transcription:
            return [event async for event in transcription]


def names(events: list[Event]) -> list[str]:
    return [event["header"]["name"] for event in events]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- open_transcription ------------------------------------------------------------------------

SENTENCE = ["SentenceBegin", "TranscriptionResultChanged", "SentenceEnd"]


async def test_events_in_order_and_client_closes(server: FakeServer) -> None:
    events = await collect(server.url, silence(2.5))
    assert names(events) == [
        "TranscriptionStarted",
        *SENTENCE * 3,
        "TranscriptionCompleted",
    ]
    assert [e["payload"]["result"] for e in events if e["header"]["name"] == "SentenceEnd"] == [
        "second 1",
        "second 2",
        "second 3",
    ]
    assert server.client_closed is not None
    with trio.fail_after(GUARD):
        await server.client_closed.wait()


async def test_session_id_and_completed_flag(server: FakeServer) -> None:
    with trio.fail_after(GUARD):
        async with open_transcription(
            server.url, pcm_chunks(silence(0.2)), 16000, token=TOKEN, appkey=APPKEY, realtime=False
        ) as transcription:
            assert transcription.session_id == "5" * 32
            assert not transcription.completed
            async for _ in transcription:
                pass
            assert transcription.completed


async def test_start_message_is_the_sdks(server: FakeServer) -> None:
    await collect(server.url, silence(0.1, 8000), sample_rate=8000, params={"vocabulary_id": "v1"})
    assert server.start is not None
    assert list(server.start["header"]) == ["message_id", "task_id", "namespace", "name", "appkey"]
    assert server.start["payload"] == {
        "format": "pcm",
        "sample_rate": 8000,
        "enable_intermediate_result": True,
        "enable_punctuation_prediction": True,
        "enable_inverse_text_normalization": True,
        "enable_words": True,
        "vocabulary_id": "v1",
    }
    assert "sdk" in server.start["context"]


async def test_params_override_defaults(server: FakeServer) -> None:
    await collect(server.url, silence(0.1), params={"enable_intermediate_result": False})
    assert server.start is not None
    assert server.start["payload"]["enable_intermediate_result"] is False


async def test_stop_has_no_payload(server: FakeServer) -> None:
    await collect(server.url, silence(0.3))
    assert server.start is not None and server.stop is not None
    assert "payload" not in server.stop
    assert server.stop["header"]["task_id"] == server.start["header"]["task_id"]
    assert server.stop["header"]["message_id"] != server.start["header"]["message_id"]


async def test_token_header_arrives(server: FakeServer) -> None:
    await collect(server.url, silence(0.1))
    assert server.headers["x-nls-token"] == TOKEN


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_bad_token_is_task_failed(server: FakeServer, token: str | None) -> None:
    with pytest.raises(TranscribeError) as info:
        await collect(server.url, silence(0.1), token=token)
    assert info.value.code == 40000001
    assert info.value.reason == "bad token"
    assert info.value.event is not None
    assert info.value.event["header"]["namespace"] == "Default"
    assert server.frame_sizes == []  # no audio before TranscriptionStarted
    if token is None:
        assert "x-nls-token" not in server.headers


@pytest.mark.parametrize(("rate", "frame_ms", "size"), [(16000, 100, 3200), (8000, 20, 320)])
async def test_frame_sizes(server: FakeServer, rate: int, frame_ms: int, size: int) -> None:
    pcm = silence(0.35, rate)
    await collect(server.url, pcm, sample_rate=rate, frame_ms=frame_ms)
    full, rest = divmod(len(pcm), size)
    assert server.frame_sizes == [size] * full + ([rest] if rest else [])


async def test_realtime_sends_frames_of_the_right_size(server: FakeServer) -> None:
    events = await collect(server.url, silence(0.3), realtime=True)
    assert names(events)[-1] == "TranscriptionCompleted"
    assert server.frame_sizes == [3200, 3200, 3200]


async def test_task_failed_mid_stream(server: FakeServer) -> None:
    server.fail_after_bytes = 32000
    with pytest.raises(TranscribeError) as info:
        await collect(server.url, silence(3))
    assert (info.value.code, info.value.reason) == (40270002, "no valid audio")


async def test_events_before_task_failed_are_delivered(server: FakeServer) -> None:
    server.fail_after_bytes = 40000
    seen: list[str] = []
    with pytest.raises(TranscribeError):
        with trio.fail_after(GUARD):
            async with open_transcription(
                server.url,
                pcm_chunks(silence(3)),
                16000,
                token=TOKEN,
                appkey=APPKEY,
                realtime=False,
            ) as transcription:
                async for event in transcription:
                    seen.append(event["header"]["name"])
    assert seen == ["TranscriptionStarted", *SENTENCE]


async def test_connection_closed_before_completion(server: FakeServer) -> None:
    server.drop_after_bytes = 6400
    with pytest.raises(TranscribeError, match=r"closed \(code 1011, fake crash\)") as info:
        await collect(server.url, silence(1))
    assert info.value.code == LOCAL_FAILURE
    assert info.value.event is None


async def test_the_socket_is_closed_after_the_server_closed(server: FakeServer) -> None:
    """trio-websocket closes its socket only when it starts the close: after the server's,
    it left it to the garbage collector (a ResourceWarning, the descriptor open until then)."""
    server.drop_after_bytes = 6400
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(TranscribeError, match="closed"):
            await collect(server.url, silence(1))
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


async def test_no_answer_to_start(server: FakeServer) -> None:
    server.never_start = True
    with pytest.raises(TranscribeError, match=r"no message from the server within 0\.2 s"):
        await collect(server.url, silence(0.1), reply_timeout=0.2)


async def test_a_server_that_stops_reading_is_given_up_on(server: FakeServer) -> None:
    """Once the socket buffers are full, no frame goes out: that wait is bounded too."""
    server.stall_after_start = True
    with pytest.raises(TranscribeError, match=r"the server read nothing for 0\.5 s") as info:
        await collect(server.url, silence(600), reply_timeout=0.5)
    assert info.value.code == LOCAL_FAILURE


async def test_connection_refused() -> None:
    with pytest.raises(TranscribeError, match="cannot connect") as info:
        await collect(f"ws://127.0.0.1:{free_port()}/ws/v1", silence(0.1))
    assert info.value.code == LOCAL_FAILURE


async def not_http_server(stream: trio.SocketStream) -> None:
    """What a TLS port sends a plain-text upgrade: an alert, no HTTP."""
    await stream.receive_some(4096)
    await stream.send_all(b"\x15\x03\x01\x00\x02\x02\x46")
    await stream.aclose()


async def test_an_answer_to_the_upgrade_that_is_not_http(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, not_http_server, 0, host="127.0.0.1"))
    url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/ws/v1"
    with pytest.raises(TranscribeError, match=r"cannot connect .*: its answer is not HTTP") as info:
        await collect(url, silence(0.1))
    assert info.value.code == LOCAL_FAILURE


async def serve(nursery: trio.Nursery, handler: Any, scheme: str = "ws") -> str:
    """Run ``handler`` for each TCP connection on a free port; return a URL to it."""
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"{scheme}://127.0.0.1:{listeners[0].socket.getsockname()[1]}/ws/v1"


async def closes_at_once(stream: trio.SocketStream) -> None:
    await stream.aclose()


async def closes_after_the_request(stream: trio.SocketStream) -> None:
    await stream.receive_some(4096)
    await stream.aclose()


async def resets(stream: trio.SocketStream) -> None:
    await stream.receive_some(4096)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()  # with a linger time of 0: a reset


async def not_tls_server(stream: trio.SocketStream) -> None:
    """A plain HTTP port, as a wss:// URL by mistake reaches it: garbage to TLS."""
    await stream.receive_some(4096)
    await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    await trio.sleep_forever()


@pytest.mark.parametrize("handler", [closes_at_once, closes_after_the_request, resets])
async def test_a_server_that_closes_without_answering_the_upgrade(
    nursery: trio.Nursery, handler: Any
) -> None:
    """trio-websocket's reader task stopped quietly and its connect waited out its timeout
    (30 s), to report only 'timed out'."""
    url = await serve(nursery, handler)
    t0 = trio.current_time()
    with pytest.raises(TranscribeError, match="the WebSocket upgrade") as info:
        await collect(url, silence(0.1))
    assert trio.current_time() - t0 < 15
    assert info.value.code == LOCAL_FAILURE
    # closes_at_once may close or reset the connection
    if handler is closes_after_the_request:
        assert info.value.reason == (
            f"cannot connect to {url}: "
            "the server closed the connection without answering the WebSocket upgrade"
        )
    elif handler is resets:
        assert "the connection broke before the answer to the WebSocket upgrade: " in str(
            info.value
        )


async def test_a_token_that_cannot_be_a_header_is_our_fault_not_the_servers(
    nursery: trio.Nursery,
) -> None:
    """h11 refuses to send the upgrade with a line break or non-ASCII in a header: that was
    reported as an answer that is not HTTP, as if the server had broken the protocol."""
    url = await serve(nursery, rejects_the_upgrade)
    for token in ("line\nbreak", "caf\u00e9"):
        with pytest.raises(TranscribeError, match="the token must be printable ASCII"):
            await collect(url, silence(0.1), token=token)


async def test_a_tls_handshake_that_fails_says_so(nursery: trio.Nursery) -> None:
    """trio-websocket shook hands in its reader task, dropped the SSL error and waited out
    its connect timeout (30 s), to report only 'timed out'."""
    url = await serve(nursery, not_tls_server, "wss")
    t0 = trio.current_time()
    with pytest.raises(
        TranscribeError, match=r"cannot connect to wss://.*: TLS handshake failed: ."
    ):
        await collect(url, silence(0.1))
    assert trio.current_time() - t0 < 15


async def rejects_the_upgrade(stream: trio.SocketStream) -> None:
    await stream.receive_some(4096)
    await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    await trio.sleep_forever()


async def test_a_rejected_upgrade(nursery: trio.Nursery) -> None:
    url = await serve(nursery, rejects_the_upgrade)
    with pytest.raises(TranscribeError, match=r"cannot connect .*: upgrade rejected with HTTP 403"):
        await collect(url, silence(0.1))


async def rejects_and_closes(answer: bytes, stream: trio.SocketStream) -> None:
    await stream.receive_some(4096)
    await stream.send_all(answer)
    await stream.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        # A body without a length runs to the end of the connection (HTTP/1.0, or a proxy's
        # error page with Connection: close): the answer is whole when the connection ends.
        b"HTTP/1.0 403 Forbidden\r\nContent-Type: text/html\r\n\r\n<h1>403 Forbidden</h1>",
        b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\nbusy",
        # A body cut short: the status has come all the same.
        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 100\r\n\r\nno",
    ],
)
async def test_a_rejection_that_ends_with_the_connection(
    nursery: trio.Nursery, answer: bytes
) -> None:
    """The server answered, with a refusal: 'closed before finishing its answer' hid its
    status, which trio-websocket reports only once the body is whole by its length."""
    url = await serve(nursery, partial(rejects_and_closes, answer))
    status = answer.split()[1].decode()
    with pytest.raises(TranscribeError) as info:
        await collect(url, silence(0.1))
    assert info.value.reason == f"cannot connect to {url}: upgrade rejected with HTTP {status}"


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes".split(),
            *"-days 2 -subj /CN=asrd -addext subjectAltName=IP:127.0.0.1".split(),
            *["-keyout", str(key), "-out", str(cert)],
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize("trusted", [True, False])
async def test_wss(
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    tls_cert: tuple[Path, Path],
    trusted: bool,
) -> None:
    """The client shakes hands with TLS itself: a certificate it trusts (SSL_CERT_FILE, as
    OpenSSL reads it) works, one it does not is named as the cause."""
    cert, key = tls_cert
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    fake = FakeServer()
    ws_server = await nursery.start(
        partial(trio_websocket.serve_websocket, fake.handler, "127.0.0.1", 0, server_tls)
    )
    url = f"wss://127.0.0.1:{ws_server.port}/ws/v1"
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        events = await collect(url, silence(1.5))
        assert names(events) == ["TranscriptionStarted", *SENTENCE * 2, "TranscriptionCompleted"]
        assert fake.violations == []
    else:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        with pytest.raises(TranscribeError, match=r"TLS handshake failed: .*CERTIFICATE_VERIFY"):
            await collect(url, silence(0.1))


async def test_bad_url() -> None:
    with pytest.raises(TranscribeError, match="bad URL"):
        await collect("http://127.0.0.1/ws/v1", silence(0.1))


async def test_leaving_early_stops_the_sender(server: FakeServer) -> None:
    with trio.fail_after(GUARD):
        async with open_transcription(
            server.url, pcm_chunks(silence(60)), 16000, token=TOKEN, appkey=APPKEY, realtime=True
        ) as transcription:
            async for event in transcription:
                assert event["header"]["name"] == "TranscriptionStarted"
                break
    assert server.stop is None


async def deaf_to_close_server(after_start: str, stream: trio.SocketStream) -> None:
    """Answers Start, then ``after_start`` ("TaskFailed", "garbage": no JSON) or (on Stop)
    Completed, but never the closing handshake."""
    ws = WSConnection(ConnectionType.SERVER)
    task_id = ""

    async def send(event: ws_events.Event) -> None:
        await stream.send_all(ws.send(event))

    async for data in stream:
        ws.receive_data(bytes(data))
        for event in ws.events():
            if isinstance(event, ws_events.Request):
                await send(ws_events.AcceptConnection())
            elif isinstance(event, ws_events.TextMessage):
                header = json.loads(event.data)["header"]
                if header["name"] == "StartTranscription":
                    task_id = header["task_id"]
                    await send(ws_events.Message(server_event("TranscriptionStarted", task_id)))
                    if after_start == "TaskFailed":
                        failed = server_event("TaskFailed", task_id, status=41040201)
                        await send(ws_events.Message(failed))
                    elif after_start == "garbage":
                        await send(ws_events.Message("garbage"))
                else:
                    done = server_event("TranscriptionCompleted", task_id)
                    await send(ws_events.Message(done))
    await trio.sleep_forever()


@pytest.mark.parametrize("fail", [True, False])
async def test_server_deaf_to_close(nursery: trio.Nursery, fail: bool) -> None:
    url = await serve(nursery, partial(deaf_to_close_server, "TaskFailed" if fail else ""))
    if fail:  # the TaskFailed, not the close timeout, is what the caller learns
        with pytest.raises(TranscribeError) as info:
            await collect(url, silence(0.1), reply_timeout=0.2)
        assert info.value.code == 41040201
    else:  # completed: a close timeout does not matter
        events = await collect(url, silence(0.1), reply_timeout=0.2)
        assert names(events) == ["TranscriptionStarted", "TranscriptionCompleted"]


async def test_a_local_failure_does_not_wait_for_the_closing_handshake(
    nursery: trio.Nursery,
) -> None:
    """A server that breaks the protocol is not one to wait on: the client waited for its
    answer to the close as long as for any reply (30 s) before it reported the failure."""
    url = await serve(nursery, partial(deaf_to_close_server, "garbage"))
    t0 = trio.current_time()
    with pytest.raises(TranscribeError, match="server sent invalid JSON: 'garbage'"):
        await collect(url, silence(0.1))  # with the reply timeout of the CLI: 30 s
    assert trio.current_time() - t0 < 15


# --- send_audio pacing (virtual time) ------------------------------------------------------


@pytest.mark.parametrize("realtime", [True, False])
async def test_send_audio_pacing(autojump_clock: trio.abc.Clock, realtime: bool) -> None:
    sent: list[tuple[float, int]] = []
    t0 = trio.current_time()

    async def send(frame: bytes) -> None:
        sent.append((trio.current_time() - t0, len(frame)))

    await send_audio(send, pcm_chunks(silence(0.25)), 16000, frame_ms=100, realtime=realtime)
    assert [size for _, size in sent] == [3200, 3200, 1600]
    times = [t for t, _ in sent]
    # Each frame leaves when its last sample would have been captured live.
    assert times == (pytest.approx([0.1, 0.2, 0.25]) if realtime else [0.0, 0.0, 0.0])


async def test_send_audio_frames_chunks_of_any_size() -> None:
    pcm = bytes(range(256)) * 40  # 10240 bytes: 3 frames of 3200 and 640 left
    sizes = [1, 999, 3200, 2, 5000, 1038]
    sent: list[bytes] = []

    async def chunks() -> AsyncIterator[bytes]:
        start = 0
        for size in sizes:
            yield pcm[start : start + size]
            start += size

    async def send(frame: bytes) -> None:
        sent.append(frame)

    await send_audio(send, chunks(), 16000, frame_ms=100, realtime=False)
    assert [len(frame) for frame in sent] == [3200, 3200, 3200, 640]
    assert b"".join(sent) == pcm


async def test_send_audio_sends_late_audio_at_once(autojump_clock: trio.abc.Clock) -> None:
    """A live source's audio comes when it was captured, at its deadline or after it: waiting
    for the next deadline on top would hold every frame back by up to a frame."""
    t0 = trio.current_time()
    sent: list[float] = []

    async def live() -> AsyncIterator[bytes]:
        for arrival in (0.25, 0.3, 1.0):  # 0.2 s of audio each
            await trio.sleep_until(t0 + arrival)
            yield silence(0.2)

    async def send(frame: bytes) -> None:
        sent.append(trio.current_time() - t0)

    await send_audio(send, live(), 16000, frame_ms=100, realtime=True)
    # Frame 3 is due at 0.3 s, when its audio comes; frame 4 at 0.4 s; frames 5 and 6 (due at
    # 0.5 and 0.6 s) came at 1.0 s.
    assert sent == pytest.approx([0.25, 0.25, 0.3, 0.4, 1.0, 1.0])


async def test_send_audio_rejects_frames_below_one_sample() -> None:
    async def send(frame: bytes) -> None:
        raise AssertionError

    with pytest.raises(ValueError, match="less than one sample"):
        await send_audio(send, pcm_chunks(silence(0.1)), 8000, frame_ms=0, realtime=False)


# --- printing ------------------------------------------------------------------------------


async def print_run(url: str, pcm: bytes, **kwargs: Any) -> int:
    options: dict[str, Any] = {
        "url": url,
        "token": TOKEN,
        "appkey": APPKEY,
        "realtime": False,
        "json_lines": False,
    }
    options.update(kwargs)
    with trio.fail_after(GUARD):
        return await transcribe_and_print(pcm_chunks(pcm), 16000, **options)


FINALS = "[0.00-1.00] second 1\n[1.00-2.00] second 2\n[2.00-2.50] second 3\n"


async def test_text_output_not_a_terminal(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await print_run(server.url, silence(2.5)) == 0
    captured = capsys.readouterr()
    assert captured.out == FINALS
    assert captured.err == ""


class Terminal(StringIO):
    def isatty(self) -> bool:
        return True


async def test_text_output_on_a_terminal_shows_partials(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert await print_run(server.url, silence(1.5)) == 0
    clear = "\r\x1b[K"
    assert terminal.getvalue() == (
        f"{clear}[0.00-0.50] second{clear}[0.00-1.00] second 1\n"
        f"{clear}[1.00-1.50] second{clear}[1.00-1.50] second 2\n"
    )


async def test_json_output(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await print_run(server.url, silence(1.2), json_lines=True) == 0
    lines = capsys.readouterr().out.splitlines()
    events = [json.loads(line) for line in lines]
    assert names(events) == ["TranscriptionStarted", *SENTENCE * 2, "TranscriptionCompleted"]


@pytest.mark.parametrize("json_lines", [False, True])
async def test_text_stdout_cannot_encode_is_escaped(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, json_lines: bool
) -> None:
    """A result with characters stdout's encoding lacks (or a lone surrogate, which JSON can
    carry and UTF-8 cannot) is printed with escapes, not a traceback."""
    server.text = "na\u00efve \ud800"
    raw = BytesIO()
    monkeypatch.setattr(sys, "stdout", TextIOWrapper(raw, encoding="ascii", write_through=True))
    assert await print_run(server.url, silence(1.0), json_lines=json_lines) == 0
    out = raw.getvalue().decode("ascii")
    if json_lines:
        events = [json.loads(line) for line in out.splitlines()]
        assert events[-2]["payload"]["result"] == "na\u00efve \ud800 1"
    else:
        assert out == "[0.00-1.00] na\\xefve \\ud800 1\n"


@pytest.mark.parametrize("json_lines", [False, True])
async def test_failure_output(
    server: FakeServer, capsys: pytest.CaptureFixture[str], json_lines: bool
) -> None:
    assert await print_run(server.url, silence(0.5), token="nope", json_lines=json_lines) == 1
    captured = capsys.readouterr()
    assert "40000001" in captured.err and "bad token" in captured.err
    if json_lines:
        assert names([json.loads(captured.out)]) == ["TaskFailed"]
    else:
        assert captured.out == ""


async def test_connection_failure_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert await print_run(f"ws://127.0.0.1:{free_port()}/ws/v1", silence(0.1)) == 1
    assert "cannot connect" in capsys.readouterr().err


# --- run_transcribe (synchronous; the fake runs in a thread) -----------------------------------


def write_wav(path: Path, rate: int, channels: int, seconds: float) -> Path:
    frames = int(rate * seconds)
    t = np.arange(frames) / rate
    mono = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(mono, channels).tobytes())
    return path


def cli(path: Path, url: str, **kwargs: Any) -> int:
    options: dict[str, Any] = {
        "url": url,
        "token": TOKEN,
        "appkey": APPKEY,
        "realtime": False,
        "json_lines": False,
    }
    options.update(kwargs)
    return run_transcribe(str(path), **options)


def test_run_transcribe_refuses_a_token_that_cannot_be_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_wav(tmp_path / "x.wav", 16000, 1, 0.1)
    assert cli(path, "ws://127.0.0.1:9/ws/v1", token="pasted\nwith a line break") == 2
    assert "--token: the token must be printable ASCII" in capsys.readouterr().err


def test_run_transcribe_refuses_an_empty_raw_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As empty stdin is: it streamed nothing and reported a transcription done."""
    path = tmp_path / "empty.pcm"
    path.write_bytes(b"")
    assert cli(path, "ws://127.0.0.1:9/ws/v1", raw_rate=16000) == 2
    assert "it is empty" in capsys.readouterr().err


def test_run_transcribe_resamples_44100_stereo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_wav(tmp_path / "cd.wav", 44100, 2, 2.0)
    with server_in_thread() as fake:
        assert cli(path, fake.url) == 0
    assert fake.start is not None
    assert fake.start["payload"]["sample_rate"] == 16000
    assert sum(fake.frame_sizes) == 2 * 32000
    assert capsys.readouterr().out == "[0.00-1.00] second 1\n[1.00-2.00] second 2\n"


@pytest.mark.parametrize(
    ("option", "link", "env"),
    [
        ([], APPKEY, "another"),  # a signed link's appkey, over $ASRD_APPKEY
        (["--appkey", APPKEY], "another", "another"),  # --appkey over everything
        ([], None, APPKEY),  # no link: $ASRD_APPKEY
    ],
)
def test_transcribe_starts_with_the_appkey_of_its_signed_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: list[str], link: str | None, env: str
) -> None:
    """A signed link only opens sessions of its own appkey (40020106 otherwise): without
    --appkey, `asrd transcribe` sent 'default' (or $ASRD_APPKEY) with a link for another."""
    from asrd.cli import main

    monkeypatch.setenv("ASRD_APPKEY", env)
    path = write_wav(tmp_path / "a.wav", 16000, 1, 0.2)
    with server_in_thread() as fake:
        url = fake.url
        if link is not None:
            url += f"?appkey={link}&ts=1&nonce=abcdefgh&sig={'0' * 64}"
        assert (
            main(["transcribe", "--fast", "--token", TOKEN, "--url", url, *option, str(path)]) == 0
        )
    assert fake.start is not None and fake.start["header"]["appkey"] == APPKEY


def test_run_transcribe_keeps_8000(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_wav(tmp_path / "phone.wav", 8000, 1, 1.0)
    with server_in_thread() as fake:
        assert cli(path, fake.url, json_lines=True) == 0
    assert fake.start is not None
    assert fake.start["payload"]["sample_rate"] == 8000
    assert sum(fake.frame_sizes) == 16000
    assert len(capsys.readouterr().out.splitlines()) == 5


def test_run_transcribe_task_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_wav(tmp_path / "a.wav", 16000, 1, 0.5)
    with server_in_thread() as fake:
        assert cli(path, fake.url, token=None) == 1
    assert "40000001" in capsys.readouterr().err


def test_run_transcribe_connection_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_wav(tmp_path / "a.wav", 16000, 1, 0.1)
    assert cli(path, f"ws://127.0.0.1:{free_port()}/ws/v1") == 1
    assert "cannot connect" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"not a wav file at all"])
def test_run_transcribe_unreadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None
) -> None:
    path = tmp_path / "x.wav"
    if content is not None:
        path.write_bytes(content)
    assert cli(path, "ws://127.0.0.1:9/ws/v1") == 2
    assert "cannot read" in capsys.readouterr().err


def test_run_transcribe_refuses_a_wav_without_a_sample_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A header with a rate of 0 (``wave`` reads one): resampling it was a traceback, not
    status 2."""
    path = write_wav(tmp_path / "x.wav", 16000, 1, 0.1)
    data = bytearray(path.read_bytes())
    data[24:28] = (0).to_bytes(4, "little")  # fmt chunk: sample rate
    path.write_bytes(bytes(data))
    assert cli(path, "ws://127.0.0.1:9/ws/v1") == 2
    assert "cannot read" in (err := capsys.readouterr().err) and "0 Hz" in err


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:9/ws/v1", "use ws://"),
        ("ws:///ws/v1", "no host"),
        ("ws://127.0.0.1:99999/ws/v1", "out of range"),
        # not the default port: the client took 0 for no port, and went to port 80
        ("ws://127.0.0.1:0/ws/v1", "port 0"),
        ("127.0.0.1:9", "use ws://"),
        # a traceback from getaddrinfo (UnicodeError), and an error blamed on the server
        (f"ws://{'a' * 64}.example/ws/v1", "is no host name"),
        ("ws://127.0.0.1:9/ws/v1?appkey=my app", "percent-encoded"),
    ],
)
def test_run_transcribe_refuses_a_url_that_is_no_websocket_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, why: str
) -> None:
    """Invalid input (2), not "failed with status 50000000" (1), which reads as a server's
    fault to retry."""
    path = write_wav(tmp_path / "x.wav", 16000, 1, 0.1)
    assert cli(path, url) == 2
    assert why in capsys.readouterr().err


# --- asrd transcribe - (stdin, a real pipe) ----------------------------------------------------


def transcribe_stdin(url: str, *argv: str) -> subprocess.Popen[bytes]:
    """``asrd transcribe ARGV -`` with a pipe for its stdin."""
    argv = ("--token", TOKEN, "--appkey", APPKEY, *argv)
    return subprocess.Popen(
        [sys.executable, "-m", "asrd", "transcribe", "--fast", "--url", url, *argv, "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_transcribe_reads_a_wav_from_stdin(tmp_path: Path) -> None:
    """As a writer to a pipe leaves one: sizes it cannot go back to fill in keep a guess
    (here 0xFFFFFFFF), and the audio runs to the end of the stream, without a warning."""
    wav = bytearray(write_wav(tmp_path / "cd.wav", 44100, 2, 2.0).read_bytes())
    wav[4:8] = wav[40:44] = b"\xff" * 4  # RIFF and data sizes
    with server_in_thread() as fake, transcribe_stdin(fake.url) as asrd:
        out, err = asrd.communicate(bytes(wav), timeout=GUARD)
    assert (out, err) == (b"[0.00-1.00] second 1\n[1.00-2.00] second 2\n", b"")
    assert fake.start is not None and fake.start["payload"]["sample_rate"] == 16000
    assert sum(fake.frame_sizes) == 2 * 32000


def test_transcribe_reads_raw_pcm_from_stdin() -> None:
    with server_in_thread() as fake, transcribe_stdin(fake.url, "--raw-rate", "8000") as asrd:
        out, err = asrd.communicate(silence(1.5, 8000) + b"\x01", timeout=GUARD)
    assert asrd.returncode == 0, err
    assert out == b"[0.00-1.00] second 1\n[1.00-1.50] second 2\n"
    assert fake.start is not None and fake.start["payload"]["sample_rate"] == 8000
    assert sum(fake.frame_sizes) == 2 * 12000  # the odd last byte is no sample


@pytest.mark.parametrize(
    ("stdin", "why"),
    [(b"", "it is empty"), (b"ID3\x04", "not a RIFF/WAVE stream (starts with b'ID3\\x04')")],
)
def test_transcribe_refuses_stdin_it_cannot_read(stdin: bytes, why: str) -> None:
    """Status 2, as for an unreadable file. A header that is no WAV is refused once it has
    come, though the stream goes on (a recorder's, without --raw-rate)."""
    with transcribe_stdin("ws://127.0.0.1:9/ws/v1") as asrd:
        assert asrd.stdin is not None and asrd.stderr is not None
        asrd.stdin.write(stdin)
        asrd.stdin.flush()
        if not stdin:
            asrd.stdin.close()
        assert asrd.wait(GUARD) == 2
        assert asrd.stderr.read().decode() == f"asrd: cannot read stdin: {why}\n"


# --- Ctrl-C ------------------------------------------------------------------------------------


def wait_until(done: Callable[[], bool]) -> None:
    """For what another thread or process does: poll, within the guard."""
    deadline = time.monotonic() + GUARD
    while not done():
        assert time.monotonic() < deadline, "not within the guard"
        time.sleep(0.01)


@pytest.mark.parametrize("then_eof", [False, True], ids=["stdin-goes-on", "stdin-ends-next"])
def test_ctrl_c_ends_the_audio_and_prints_the_last_results(then_eof: bool) -> None:
    """As for a live microphone: Ctrl-C ends what is sent, the results for it come, status 0.
    stdin may go on (arecord from another terminal) or end right after (a recorder in the
    same terminal gets the SIGINT too). It was a KeyboardInterrupt: status 130, no results."""
    with server_in_thread() as fake, transcribe_stdin(fake.url, "--raw-rate", "16000") as asrd:
        assert asrd.stdin is not None and asrd.stdout is not None and asrd.stderr is not None
        asrd.stdin.write(silence(1.5))
        asrd.stdin.flush()
        wait_until(lambda: sum(fake.frame_sizes) == 48000)
        asrd.send_signal(signal.SIGINT)
        if then_eof:
            asrd.stdin.close()
        assert asrd.stdout.read() == b"[0.00-1.00] second 1\n[1.00-1.50] second 2\n"
        assert asrd.wait(GUARD) == 0
        err = asrd.stderr.read().decode()
        assert "Ctrl-C: the audio ends here; the last results follow" in err, err
        assert "already" not in err, err
    assert fake.stop is not None


def test_ctrl_c_after_stdin_ended_still_waits_for_the_last_results() -> None:
    """The recorder's end came first (it got the SIGINT before us): the audio has ended
    already, and the results the server is still working on are printed. The message says
    so: it said "the audio ends here", though nothing was cut off."""
    with server_in_thread() as fake, transcribe_stdin(fake.url, "--raw-rate", "16000") as asrd:
        assert asrd.stdin is not None and asrd.stdout is not None and asrd.stderr is not None
        fake.hold_stop = threading.Event()
        asrd.stdin.write(silence(1.5))
        asrd.stdin.close()
        wait_until(lambda: fake.stop is not None)
        asrd.send_signal(signal.SIGINT)
        line = read_until(asrd.stderr, "Ctrl-C", GUARD)[-1]
        fake.hold_stop.set()
        assert "Ctrl-C: the audio had already ended; waiting for the last results" in line
        assert asrd.stdout.read() == b"[0.00-1.00] second 1\n[1.00-1.50] second 2\n"
        assert asrd.wait(GUARD) == 0


def test_a_second_ctrl_c_quits_at_once() -> None:
    """A server that answers nothing more: after the first Ctrl-C the client would wait the
    30 s a reply may take and end with 1; the second quits at once, with 130, without the
    closing handshake (the server would not answer it either)."""
    with server_in_thread() as fake:
        fake.stall_after_start = True
        with transcribe_stdin(fake.url, "--raw-rate", "16000", "--json") as asrd:
            assert asrd.stdin is not None and asrd.stdout is not None
            assert asrd.stderr is not None
            asrd.stdin.write(silence(1.0))
            asrd.stdin.flush()
            read_until(asrd.stdout, "TranscriptionStarted", GUARD)
            asrd.send_signal(signal.SIGINT)
            read_until(asrd.stderr, "Ctrl-C", GUARD)
            asrd.send_signal(signal.SIGINT)
            assert asrd.wait(GUARD) == 130
            assert "Traceback" not in asrd.stderr.read().decode()


async def _transcribe_into(
    status: list[int], source: AudioInput, server: FakeServer, realtime: bool
) -> None:
    """``asrd transcribe``'s body on ``source``, its status appended to ``status``."""
    status.append(
        await transcribe_input(
            source,
            url=server.url,
            token=TOKEN,
            appkey=APPKEY,
            realtime=realtime,
            json_lines=False,
        )
    )


async def test_ctrl_c_before_the_audio_began_quits(server: FakeServer) -> None:
    """Nothing was sent: there is nothing to wait for. It does not connect."""
    read_end, write_end = os.pipe()
    # Unbuffered, as asrd transcribe opens stdin for its reads in a thread.
    stdin = open(read_end, "rb", buffering=0)  # noqa: ASYNC230
    with stdin, open(write_end, "wb") as writer:  # noqa: ASYNC230
        source = AudioInput(stdin, "stdin", raw_rate=16000)
        status: list[int] = []
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_transcribe_into, status, source, server, False)
                await trio.testing.wait_all_tasks_blocked()  # reading stdin
                signal.raise_signal(signal.SIGINT)
        writer.close()  # the read left waiting returns
    assert status == [130]
    assert server.start is None


async def _two_ctrl_c_over_a_partial(
    server: FakeServer, terminal: Terminal, noted: Callable[[], bool]
) -> list[int]:
    """Transcribe a stdin that goes on; once the server's partial result is on ``terminal``,
    Ctrl-C, and once ``noted()`` says its note is out, Ctrl-C again. The exit status."""
    server.stall_after_partial = True  # the server sends nothing more
    read_end, write_end = os.pipe()
    # Unbuffered, as asrd transcribe opens stdin for its reads in a thread.
    stdin = open(read_end, "rb", buffering=0)  # noqa: ASYNC230
    status: list[int] = []
    with stdin, open(write_end, "wb") as writer:  # noqa: ASYNC230
        writer.write(silence(1.0))  # stdin goes on: the first Ctrl-C ends the audio
        writer.flush()
        source = AudioInput(stdin, "stdin", raw_rate=16000)
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_transcribe_into, status, source, server, False)
                while not terminal.getvalue():  # noqa: ASYNC110 - no event to wait on
                    await trio.sleep(0.01)
                signal.raise_signal(signal.SIGINT)
                while not noted():  # noqa: ASYNC110 - the same
                    await trio.sleep(0.01)
                signal.raise_signal(signal.SIGINT)
        writer.close()  # the read left waiting returns
    return status


async def test_a_second_ctrl_c_leaves_the_terminal_on_a_clean_line(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A partial result on the terminal when the second Ctrl-C quits is cleared, as at any
    other end: it was left there, and the shell's prompt came after it on its line."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    with caplog.at_level("INFO"):
        status = await _two_ctrl_c_over_a_partial(server, terminal, lambda: "Ctrl-C" in caplog.text)
    assert status == [130]
    clear = "\r\x1b[K"
    assert terminal.getvalue() == f"{clear}[0.00-0.50] second{clear}"


async def test_a_line_logged_over_a_partial_result_starts_on_a_clean_line(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """stdout and stderr one terminal: the partial result shown is cleared before Ctrl-C's
    note is logged. The note came after the partial's text on its line, and the next
    partial's rewrite garbled it."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    to_stderr = logging.StreamHandler(terminal)  # as logs.setup's, without the time
    to_stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(to_stderr)
    try:
        with caplog.at_level("INFO"):
            status = await _two_ctrl_c_over_a_partial(
                server, terminal, lambda: "Ctrl-C" in terminal.getvalue()
            )
    finally:
        logging.getLogger().removeHandler(to_stderr)
    assert status == [130]
    clear = "\r\x1b[K"
    assert terminal.getvalue() == (
        f"{clear}[0.00-0.50] second{clear}INFO asrd.transcribe: Ctrl-C: the audio ends here;"
        " the last results follow (Ctrl-C again: quit)\n"
    )


async def test_ctrl_c_on_a_file_sent_at_real_time(
    server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The audio ends where Ctrl-C came, and a file read no further than that is not one
    'cut off before the end its header declares'."""
    path = write_wav(tmp_path / "long.wav", 16000, 1, 30.0)  # more than is read ahead
    status: list[int] = []
    with open(path, "rb", buffering=0) as f, caplog.at_level("INFO"):  # noqa: ASYNC230
        source = AudioInput(f, str(path))
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_transcribe_into, status, source, server, True)
                while sum(server.frame_sizes) < 32000:  # noqa: ASYNC110 - no event to wait on
                    await trio.sleep(0.01)
                signal.raise_signal(signal.SIGINT)
    assert status == [0]
    assert capsys.readouterr().out.startswith("[0.00-1.00] second 1\n")
    assert server.stop is not None and sum(server.frame_sizes) < 2 * 16000 * 30
    assert "declares" not in caplog.text
    assert "Ctrl-C: the audio ends here" in caplog.text


def test_run_transcribe_sends_a_cut_off_file_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """An interrupted copy: its audio is sent as far as it goes, and the user learns that it
    ends early."""
    path = write_wav(tmp_path / "cut.wav", 16000, 1, 2.0)
    path.write_bytes(path.read_bytes()[: 44 + 48000])
    with server_in_thread() as fake, caplog.at_level("WARNING", logger="asrd.audio"):
        assert cli(path, fake.url) == 0
    assert sum(fake.frame_sizes) == 48000
    assert capsys.readouterr().out == "[0.00-1.00] second 1\n[1.00-1.50] second 2\n"
    assert "the WAV header declares 64000 bytes of audio, the file holds 48000" in caplog.text


# --- asrd transcribe's input, read as it comes ---------------------------------------------


def wav_bytes(
    pcm: bytes, rate: int, channels: int, *, width: int = 2, data_size: int | None = None
) -> bytes:
    """A WAV of the 16-bit samples ``pcm``, stored ``width`` bytes wide (2 or 3); ``data_size``
    0xFFFFFFFF as a writer to a pipe leaves it."""
    if width == 3:  # each sample's bytes after a zero low byte
        wide = np.zeros((len(pcm) // 2, 3), dtype=np.uint8)
        wide[:, 1:] = np.frombuffer(pcm, dtype=np.uint8).reshape(-1, 2)
        pcm = wide.tobytes()
    out = BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm)
    wav = bytearray(out.getvalue())
    if data_size is not None:
        wav[40:44] = data_size.to_bytes(4, "little")
    return bytes(wav)


def noise(seconds: float, rate: int, channels: int = 1) -> bytes:
    rng = np.random.default_rng(11)
    return (rng.standard_normal(int(seconds * rate) * channels) * 3000).astype("<i2").tobytes()


class Pipe(io.RawIOBase):
    """``data`` as a pipe gives it, in reads of at most ``sizes`` bytes (in turn); then its end,
    zeros for ever (``endless``) or an I/O error (``broken``). ``taken``: bytes read."""

    def __init__(
        self,
        data: bytes,
        sizes: Sequence[int] = (READ_BYTES,),
        *,
        endless: bool = False,
        broken: bool = False,
    ) -> None:
        self._data = data
        self._sizes = itertools.cycle(sizes)
        self._endless = endless
        self._broken = broken
        self.taken = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), next(self._sizes))
        data = self._data[self.taken : self.taken + n]
        if not data and self._broken:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if not data and self._endless:
            data = bytes(n)
        buffer[: len(data)] = data
        self.taken += len(data)
        return len(data)


async def test_the_input_is_read_as_it_is_sent_and_holds_a_bounded_amount() -> None:
    """It was read whole first, up to 256 MiB, and resampled whole: 2 GB of float64 copies
    for 256 MiB of CD audio. Here 60 s of a WAV stream that does not end."""
    header = len(wav_bytes(b"", 44100, 2))
    pipe = Pipe(wav_bytes(noise(1, 44100, 2), 44100, 2, data_size=0xFFFFFFFF), endless=True)
    source = AudioInput(pipe, "stdin")
    assert await source.begin() == 16000
    lookahead = Resampler(44100, 16000).lookahead
    chunks_out, chunks_in = trio.open_memory_channel[bytes](AHEAD_CHUNKS)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.pump, chunks_out)
            # Nothing is sent: the reading stops once AHEAD_CHUNKS chunks wait.
            while not chunks_out.statistics().tasks_waiting_send:  # noqa: ASYNC110 - no event
                await trio.sleep(0.01)
            assert pipe.taken - header <= (AHEAD_CHUNKS + 2) * READ_BYTES
            sent_s = 0.0
            while sent_s < 60:
                chunk = await chunks_in.receive()
                sent_s += len(chunk) / 32000
                assert len(chunk) <= READ_BYTES
                assert source.held <= 4 + 2 * (2 * lookahead + 1)
                ahead = pipe.taken - header - sent_s * 44100 * 4
                assert ahead <= (AHEAD_CHUNKS + 3) * READ_BYTES
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("sizes", [(READ_BYTES,), (1, 7, 4099, 333, 60001)])
async def test_how_the_input_comes_does_not_change_its_audio(sizes: Sequence[int]) -> None:
    """A sample frame cut between reads waits for its rest, and the resampler gives the same
    samples for the stream as for the whole."""
    stereo = noise(1.5, 22050, 2)
    source = AudioInput(Pipe(wav_bytes(stereo, 22050, 2), sizes), "x.wav")
    assert await source.begin() == 16000
    chunks_out, chunks_in = trio.open_memory_channel[bytes](math.inf)
    await source.pump(chunks_out)
    audio = b"".join([chunk async for chunk in chunks_in])
    mono = to_pcm16_mono(stereo, sample_width=2, channels=2)
    assert audio == resample(mono, 22050, 16000)


async def test_a_read_error_ends_the_audio_where_it_broke_off(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The results for the audio that came, then why there are no more: status 2, as for an
    input that cannot be read at all."""
    source = AudioInput(Pipe(silence(1.5), broken=True), "stdin", raw_rate=16000)
    with trio.fail_after(GUARD):
        status = await transcribe_input(
            source, url=server.url, token=TOKEN, appkey=APPKEY, realtime=False, json_lines=False
        )
    assert status == 2
    assert capsys.readouterr() == (
        "[0.00-1.00] second 1\n[1.00-1.50] second 2\n",
        "asrd: cannot read stdin: [Errno 5] Input/output error (the audio sent ends there)\n",
    )
    assert sum(server.frame_sizes) == 48000


# --- asrd transcribe against the real gateway (nats-server, pocketsphinx workers) ----------


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    """The next line of a child's output; ``buffer`` keeps what came after it."""
    while b"\n" not in buffer:
        data = await stream.receive_some()
        if not data:
            raise AssertionError(f"its output ended; read: {bytes(buffer)!r}")
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


def words(line: str) -> str:
    return line.split("] ", 1)[1]


async def test_transcribe_prints_a_sentence_while_its_input_goes_on(
    gateway: RunningGateway,
) -> None:
    """A live source (arecord ... | asrd transcribe --raw-rate 16000 -): each sentence is
    printed once it is over, not once the input ends. stdin was read to its end first."""
    argv = [sys.executable, "-m", "asrd", "transcribe", "--fast", "--url", gateway.url]
    argv += ["--token", "t", "--appkey", "default", "--raw-rate", "16000", "-"]
    first = silence(0.3) + load_clip("0880") + silence(1.5)  # the sentence ends by silence
    second = load_clip("0930") + silence(1.0)
    out = bytearray()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            run = partial(trio.run_process, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            asrd: trio.Process = await nursery.start(run)
            assert asrd.stdin is not None and asrd.stdout is not None
            for i in range(0, len(first), 6400):  # 0.2 s at a time, a little faster than live
                await asrd.stdin.send_all(first[i : i + 6400])
                await trio.sleep(0.05)
            line = await read_line(asrd.stdout, out)  # stdin still open
            assert wer([transcripts()["0880"]], [words(line)]) < 0.5, line
            await asrd.stdin.send_all(second)
            await asrd.stdin.aclose()
            line = await read_line(asrd.stdout, out)
            assert wer([transcripts()["0930"]], [words(line)]) < 0.5, line
    assert asrd.returncode == 0


@pytest.mark.parametrize(("rate", "channels", "width"), [(44100, 2, 3), (22050, 1, 2)])
async def test_transcribe_resamples_a_file_as_it_reads_it(
    gateway: RunningGateway, tmp_path: Path, rate: int, channels: int, width: int
) -> None:
    """A recording at a rate the gateway does not take is resampled to 16 kHz chunk by chunk,
    and transcribed as its 16-kHz original is. Its 64-KiB reads of 24-bit stereo end in the
    middle of sample frames, which wait for their rest."""
    pcm = silence(0.3) + load_clip("0880") + silence(0.8)
    original = tmp_path / "original.wav"
    original.write_bytes(wav_bytes(pcm, 16000, 1))
    other = np.repeat(np.frombuffer(audio_fixtures.resample(pcm, 16000, rate), "<i2"), channels)
    path = tmp_path / f"{rate}.wav"
    path.write_bytes(wav_bytes(other.tobytes(), rate, channels, width=width))
    if width == 3:
        assert (READ_BYTES - 44) % 6, "the first read ends mid-frame"
    argv = [sys.executable, "-m", "asrd", "transcribe", "--fast", "--url", gateway.url]
    argv += ["--token", "t", "--appkey", "default"]
    texts = []
    for wav in (original, path):
        with trio.fail_after(120):
            done = await trio.run_process([*argv, str(wav)], capture_stdout=True)
        texts.append([words(line) for line in done.stdout.decode().splitlines()])
    assert texts[1] == texts[0]
    assert wer([transcripts()["0880"]], texts[0]) < 0.5
