"""A streaming client of the Alibaba NLS real-time transcription protocol: the library under
``asrd transcribe`` (asrd.transcribe) and the tests.

It speaks the protocol the way the official Python SDK does (README, "The protocol asrd
speaks"), so it doubles as a smoke test of the gateway. :func:`open_transcription` connects,
starts, streams audio in a background task and yields the server's events.
"""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import h11
import trio
import trio_websocket

from asrd import __version__
from asrd.errors import AsrdError, ServerError

__all__ = [
    "BAD_TOKEN",
    "LOCAL_FAILURE",
    "NAMESPACE",
    "TranscribeError",
    "Transcription",
    "header_safe",
    "open_transcription",
    "pcm_chunks",
    "send_audio",
    "start_message",
    "stop_message",
    "url_problem",
]

Event = dict[str, Any]

NAMESPACE = "SpeechTranscriber"
# Status reported for failures the server did not name (connection lost, timeout, garbage).
LOCAL_FAILURE = ServerError.code


class TranscribeError(AsrdError):
    """The transcription did not complete.

    ``code``/``reason`` are the ``status``/``status_text`` of the server's ``TaskFailed``
    (then ``event`` is that message), or :data:`LOCAL_FAILURE` with a description when the
    connection failed, timed out, or the server broke the protocol (``event`` is ``None``).
    """

    def __init__(self, code: int, reason: str, *, event: Event | None = None) -> None:
        super().__init__(reason, code=code)
        self.event = event


def _new_id() -> str:
    return uuid.uuid4().hex


def _context() -> dict[str, object]:
    return {"sdk": {"name": "asrd", "version": __version__, "language": "python"}}


def start_message(
    task_id: str, appkey: str, sample_rate: int, params: dict[str, object] | None = None
) -> Event:
    """``StartTranscription`` as the official SDK builds it; ``params`` override the defaults."""
    payload: dict[str, object] = {
        "format": "pcm",
        "sample_rate": sample_rate,
        "enable_intermediate_result": True,
        "enable_punctuation_prediction": True,
        "enable_inverse_text_normalization": True,
        "enable_words": True,
    }
    payload.update(params or {})
    return {
        "header": _command_header(task_id, appkey, "StartTranscription"),
        "payload": payload,
        "context": _context(),
    }


def link_appkey(url: str) -> str | None:
    """The ``appkey=`` of a signed link (asrd sign-url) in ``url``, else None."""
    query = parse_qs(urlsplit(url).query)
    return query["appkey"][0] if "sig" in query and query.get("appkey") else None


def stop_message(task_id: str, appkey: str) -> Event:
    """``StopTranscription`` with no ``payload`` key, as the Python and Go SDKs send it."""
    return {"header": _command_header(task_id, appkey, "StopTranscription"), "context": _context()}


def _command_header(task_id: str, appkey: str, name: str) -> dict[str, str]:
    return {
        "message_id": _new_id(),
        "task_id": task_id,
        "namespace": NAMESPACE,
        "name": name,
        "appkey": appkey,
    }


def pcm_chunks(pcm: bytes) -> trio.MemoryReceiveChannel[bytes]:
    """``pcm`` (16-bit mono) as the audio :func:`open_transcription` takes, for audio that is
    all there already. A channel, not an async generator: trio warns of one left unfinished
    (a transcription that failed)."""
    send, receive = trio.open_memory_channel[bytes](1)
    with send:
        send.send_nowait(pcm)
    return receive


async def send_audio(
    send: Callable[[bytes], Awaitable[object]],
    audio: AsyncIterable[bytes],
    sample_rate: int,
    *,
    frame_ms: int = 100,
    realtime: bool,
) -> None:
    """Send the pcm16 mono of ``audio``, chunks of any size as they come, in frames of
    ``frame_ms`` (the last one: what is left).

    With ``realtime`` each frame leaves when its last sample would have been captured live
    (deadlines from one start time, so delays do not accumulate), or as soon as its audio has
    come if that is later (a live source); otherwise frames go as fast as ``send`` accepts
    them, i.e. at the pace of the server's backpressure.
    """
    frame_bytes = 2 * (sample_rate * frame_ms // 1000)
    if frame_bytes <= 0:
        raise ValueError(f"frame_ms={frame_ms} at {sample_rate} Hz is less than one sample")
    bytes_per_second = 2 * sample_rate
    t0 = trio.current_time()
    sent = 0

    async def send_frame(frame: bytes) -> None:
        nonlocal sent
        sent += len(frame)
        if realtime:
            await trio.sleep_until(t0 + sent / bytes_per_second)
        await send(frame)

    rest = b""  # less than a frame, waiting for the next chunk
    async for chunk in audio:
        data = rest + chunk if rest else chunk
        whole = len(data) - len(data) % frame_bytes
        for start in range(0, whole, frame_bytes):
            await send_frame(data[start : start + frame_bytes])
        rest = data[whole:]
    if rest:
        await send_frame(rest)


class Transcription:
    """The server events of one running transcription, as an async iterator.

    Iteration yields every event, starting with ``TranscriptionStarted`` and ending with
    ``TranscriptionCompleted``; a ``TaskFailed`` or a lost connection raises
    :class:`TranscribeError` instead.
    """

    def __init__(
        self, ws: trio_websocket.WebSocketConnection, task_id: str, appkey: str, timeout: float
    ) -> None:
        self.task_id = task_id
        self.session_id = ""
        self.completed = False
        # The audio came to its own end, all of it framed for the sender: end_audio() cuts
        # nothing off.
        self.audio_ended = False
        self._ws = ws
        self._appkey = appkey
        self._timeout = timeout
        self._pending: list[Event] = []
        self._finished = False
        self._started = False
        self._stop_sent = False
        self._receive_scope: trio.CancelScope | None = None
        self._audio_scope = trio.CancelScope()  # the framing of the audio, for end_audio()

    def __aiter__(self) -> Transcription:
        return self

    def end_audio(self) -> None:
        """End the audio here, as if it had ended (a user's Ctrl-C): the frame being sent goes
        out whole, none after it, then ``StopTranscription``; the last results are waited for
        as after any Stop. Nothing if the audio has ended already (:attr:`audio_ended`)."""
        self._audio_scope.cancel()

    async def __anext__(self) -> Event:
        if self._pending:
            return self._pending.pop(0)
        if self._finished:
            raise StopAsyncIteration
        event = await self._receive()
        name = event["header"]["name"]
        if name == "TaskFailed":
            self._finished = True
            raise _task_failed(event)
        if name == "TranscriptionCompleted":
            self._finished = self.completed = True
        return event

    async def _start(self, message: Event) -> None:
        """Send ``StartTranscription`` and wait (bounded) for ``TranscriptionStarted``."""
        try:
            await self._ws.send_message(json.dumps(message))
        except trio_websocket.ConnectionClosed as e:
            raise _closed_error(e) from None
        event = await self._receive()
        name = event["header"]["name"]
        if name == "TaskFailed":
            self._finished = True
            raise _task_failed(event)
        if name != "TranscriptionStarted":
            raise TranscribeError(LOCAL_FAILURE, f"expected TranscriptionStarted, got {name}")
        payload = event.get("payload")
        if isinstance(payload, dict) and isinstance(payload.get("session_id"), str):
            self.session_id = payload["session_id"]
        self._pending.append(event)
        self._started = True

    async def _stream(
        self, audio: AsyncIterable[bytes], sample_rate: int, frame_ms: int, realtime: bool
    ) -> None:
        """Sender task: audio, then ``StopTranscription``; from then on replies are bounded.

        The audio is framed (and paced) in a task of its own that :meth:`end_audio` cancels,
        and handed over frame by frame: a frame cut off in the middle of its write would leave
        the server to read the Stop as the rest of it.
        """
        frames_out, frames_in = trio.open_memory_channel[bytes](0)
        with _unwrap_single():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._frame, frames_out, audio, sample_rate, frame_ms, realtime)
                try:
                    async for frame in frames_in:
                        await self._send(frame)
                    await self._send(json.dumps(stop_message(self.task_id, self._appkey)))
                except trio_websocket.ConnectionClosed:
                    nursery.cancel_scope.cancel()
                    return  # the receiving side reports why
        self._stop_sent = True
        if self._receive_scope is not None:
            self._receive_scope.deadline = trio.current_time() + self._timeout

    async def _frame(
        self,
        frames: trio.MemorySendChannel[bytes],
        audio: AsyncIterable[bytes],
        sample_rate: int,
        frame_ms: int,
        realtime: bool,
    ) -> None:
        """The frames of ``audio`` into ``frames``, until its end or :meth:`end_audio`."""
        with frames, self._audio_scope:
            await send_audio(frames.send, audio, sample_rate, frame_ms=frame_ms, realtime=realtime)
            self.audio_ended = True

    async def _send(self, message: str | bytes) -> None:
        """One message out, bounded: a server that reads nothing for so long has stalled."""
        with trio.move_on_after(self._timeout):
            await self._ws.send_message(message)
            return
        raise TranscribeError(LOCAL_FAILURE, f"the server read nothing for {self._timeout:g} s")

    async def _receive(self) -> Event:
        """Next server message; unbounded while we stream, bounded before Start and after Stop."""
        bounded = self._stop_sent or not self._started
        message: str | bytes | None = None
        with trio.CancelScope() as scope:
            self._receive_scope = scope
            if bounded:
                scope.deadline = trio.current_time() + self._timeout
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed as e:
                raise _closed_error(e) from None
            finally:
                self._receive_scope = None
        if message is None:
            raise TranscribeError(
                LOCAL_FAILURE, f"no message from the server within {self._timeout:g} s"
            )
        return _parse_event(message)


def _parse_event(message: str | bytes) -> Event:
    if isinstance(message, bytes):
        raise TranscribeError(LOCAL_FAILURE, "server sent a binary message")
    try:
        event = json.loads(message)
    except ValueError:
        raise TranscribeError(
            LOCAL_FAILURE, f"server sent invalid JSON: {message[:200]!r}"
        ) from None
    header = event.get("header") if isinstance(event, dict) else None
    if not isinstance(header, dict) or not isinstance(header.get("name"), str):
        raise TranscribeError(
            LOCAL_FAILURE, f"server message without header.name: {message[:200]!r}"
        )
    result: Event = event
    return result


def _task_failed(event: Event) -> TranscribeError:
    header = event["header"]
    status = header.get("status")
    code = status if isinstance(status, int) else LOCAL_FAILURE
    return TranscribeError(code, str(header.get("status_text", "TaskFailed")), event=event)


def _closed_error(e: trio_websocket.ConnectionClosed) -> TranscribeError:
    how = "connection closed"
    if e.reason is not None:
        how += f" (code {e.reason.code}{', ' + e.reason.reason if e.reason.reason else ''})"
    return TranscribeError(LOCAL_FAILURE, f"{how} before TranscriptionCompleted")


@contextmanager
def _unwrap_single() -> Iterator[None]:
    """Let a lone exception out of a nursery unwrapped, so callers can catch it by type."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@asynccontextmanager
async def open_transcription(
    url: str,
    audio: AsyncIterable[bytes],
    sample_rate: int,
    *,
    token: str | None,
    appkey: str,
    realtime: bool,
    frame_ms: int = 100,
    params: dict[str, object] | None = None,
    reply_timeout: float = 30.0,
) -> AsyncIterator[Transcription]:
    """Connect, start, and stream ``audio`` in a background task: chunks of 16-bit mono, of any
    size, as they come (:func:`pcm_chunks` for bytes); its end is the end of the audio.

    Entering returns once the server answered ``TranscriptionStarted`` (or raises
    :class:`TranscribeError`); the body iterates the events. Leaving closes the connection
    and stops the sender, even mid-stream; after a local failure (a :class:`TranscribeError`
    whose ``event`` is None) without waiting for the server to answer the close.
    ``reply_timeout`` bounds connecting, the answer to Start, each send (a server that reads
    nothing for so long has stalled), each wait for a message after Stop and the close;
    while audio is still going out the server may stay silent as long as it likes.
    """
    if (why := url_problem(url)) is not None:
        raise TranscribeError(LOCAL_FAILURE, f"bad URL {url!r}: {why}")
    if token is not None and not header_safe(token):
        raise TranscribeError(LOCAL_FAILURE, BAD_TOKEN)
    task_id = _new_id()
    headers = [(b"X-NLS-Token", token.encode())] if token else []
    try:
        with _unwrap_single():
            async with trio.open_nursery() as nursery:  # trio-websocket's reader task
                ws, stream = await _connect(nursery, url, headers, reply_timeout)
                transcription = Transcription(ws, task_id, appkey, reply_timeout)
                local_failure = False
                try:
                    await transcription._start(start_message(task_id, appkey, sample_rate, params))
                    with _unwrap_single():
                        async with trio.open_nursery() as senders:
                            senders.start_soon(
                                transcription._stream, audio, sample_rate, frame_ms, realtime
                            )
                            try:
                                yield transcription
                            finally:
                                senders.cancel_scope.cancel()
                except TranscribeError as e:
                    local_failure = e.event is None
                    raise
                finally:
                    # After a local failure (no reply in time, one that breaks the protocol)
                    # the server is stalled or broken: its answer to the close is not worth
                    # a wait. A close cancelled at once closes the socket without one.
                    with trio.move_on_after(0 if local_failure else reply_timeout) as closing:
                        await ws.aclose()
                    # The socket: trio-websocket closes it only after a close of ours
                    await trio.aclose_forcefully(stream)
                    nursery.cancel_scope.cancel()
                # Reached only when the body succeeded: its error wins over this one.
                if closing.cancelled_caught and not transcription.completed:
                    raise TranscribeError(LOCAL_FAILURE, "timed out closing the connection")
    except trio_websocket.ConnectionRejected as e:
        raise TranscribeError(
            LOCAL_FAILURE, f"cannot connect to {url}: upgrade rejected with HTTP {e.status_code}"
        ) from e
    except h11.ProtocolError as e:  # trio-websocket lets it out when the answer is no HTTP
        raise TranscribeError(
            LOCAL_FAILURE, f"cannot connect to {url}: its answer is not HTTP"
        ) from e


async def _connect(
    nursery: trio.Nursery, url: str, headers: list[tuple[bytes, bytes]], timeout: float
) -> tuple[trio_websocket.WebSocketConnection, trio.abc.Stream]:
    """Open the WebSocket to ``url``, its reader task in ``nursery``, within ``timeout``;
    return it and the stream under it.

    Not trio-websocket's open_websocket_url: a failed TLS handshake and a server that closes
    before answering the upgrade came out of it only as a timeout, after ``timeout``. It
    shakes hands with TLS in its reader task and drops the error; and that task stops
    quietly where the stream ends, leaving the connect to wait for an answer.
    """
    try:
        with trio.fail_after(timeout):
            return await _open(nursery, url, headers)
    except trio.TooSlowError:
        why = "timed out"
    except trio.BrokenResourceError as e:  # only the TLS handshake lets one out
        why = f"TLS handshake failed: {e.__cause__ or e}"
    except OSError as e:  # no such host, refused, unreachable; or _upgrade's ConnectionError
        why = str(e) or type(e).__name__
    raise TranscribeError(LOCAL_FAILURE, f"cannot connect to {url}: {why}")


async def _open(
    nursery: trio.Nursery, url: str, headers: list[tuple[bytes, bytes]]
) -> tuple[trio_websocket.WebSocketConnection, trio.abc.Stream]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    tls = parts.scheme == "wss"
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, parts.port or (443 if tls else 80))
    try:
        if tls:
            stream = tls_stream = trio.SSLStream(
                stream, ssl.create_default_context(), server_hostname=host, https_compatible=True
            )
            await tls_stream.do_handshake()
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        ws = await _upgrade(nursery, stream, parts.netloc.rpartition("@")[2], target, headers)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return ws, stream


async def _upgrade(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    host: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
) -> trio_websocket.WebSocketConnection:
    """trio_websocket.wrap_client_stream, but a ConnectionError where the stream ends first
    (ConnectionRejected if a refusal came whole up to its body)."""
    ended = trio.CancelScope()
    watched = _EndWatch(stream, ended.cancel)
    with ended:
        # Its docstring takes any trio.abc.Stream; its annotation names two kinds.
        return await trio_websocket.wrap_client_stream(
            nursery, cast(trio.SocketStream, watched), host, target, extra_headers=headers
        )
    if (refusal := _refusal(bytes(watched.answer))) is not None:
        raise refusal
    if watched.broken is not None:
        raise ConnectionError(
            f"the connection broke before the answer to the WebSocket upgrade: {watched.broken}"
        )
    how = "before finishing its answer to" if watched.answer else "without answering"
    raise ConnectionError(f"the server closed the connection {how} the WebSocket upgrade")


def _refusal(answer: bytes) -> trio_websocket.ConnectionRejected | None:
    """The refusal that ``answer`` (bytes that came before the connection ended) begins with,
    once its head is whole; else None.

    trio-websocket reports a refusal once its body is whole by its length; a body without one
    (HTTP/1.0, a proxy's error page with Connection: close) runs to the end of the connection,
    which it never tells wsproto of, and a body cut short never ends.
    """
    http = h11.Connection(h11.CLIENT)
    http.send(h11.Request(method="GET", target="/", headers=[("Host", "-")]))
    http.send(h11.EndOfMessage())
    http.receive_data(answer)
    try:
        event = http.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Response):  # its head is not whole yet, or a 1xx
        return None
    return trio_websocket.ConnectionRejected(event.status_code, tuple(event.headers), None)


# What _EndWatch keeps of what came: the answer to the upgrade, as much as h11 reads of a head.
_ANSWER_BYTES = 16 << 10


class _EndWatch(trio.abc.Stream):
    """A stream that calls ``on_end`` where it ends (its end, a reset) and notes how.

    trio-websocket's reader task stops there without a word: this is how the wait for the
    answer to the upgrade learns of it.
    """

    def __init__(self, stream: trio.abc.Stream, on_end: Callable[[], object]) -> None:
        self._stream = stream
        self._on_end = on_end
        self.answer = bytearray()  # the first bytes that came, up to _ANSWER_BYTES
        self.broken: BaseException | None = None  # why it broke, if it did

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            data = bytes(await self._stream.receive_some(max_bytes))
        except trio.BrokenResourceError as e:
            self._broke(e)
            raise
        if not data:
            self._on_end()
        if len(self.answer) < _ANSWER_BYTES:
            self.answer += data[: _ANSWER_BYTES - len(self.answer)]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as e:
            self._broke(e)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _broke(self, error: trio.BrokenResourceError) -> None:
        self.broken = self.broken or error.__cause__ or error
        self._on_end()


BAD_TOKEN = "the token must be printable ASCII without spaces"


def header_safe(value: str) -> bool:
    """Whether ``value`` can go in an HTTP header as it is. h11 refuses a line break or a
    character beyond ASCII where it builds the upgrade request, and that came out as an
    answer that "is not HTTP", as if the server had broken the protocol."""
    return all("!" <= c <= "~" for c in value)


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a WebSocket server's address, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - it raises for a port that is no number or out of range
    except ValueError as e:
        return str(e)
    if parts.scheme not in ("ws", "wss"):
        return "use ws://HOST:PORT/PATH (or wss://)"
    if not parts.hostname:
        return "no host"
    try:
        parts.hostname.encode("idna")
    except UnicodeError:  # a label of more than 63 characters, or an empty one
        return f"{parts.hostname!r} is no host name"
    if any(c.isspace() or not c.isprintable() for c in url):
        return "spaces and control characters must be percent-encoded (%20)"
    if parts.port == 0:  # no server listens there; _open would take it for no port (80, 443)
        return "port 0 is no server's port"
    return None
