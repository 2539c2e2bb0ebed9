"""``asrd transcribe``: stream a file or stdin to a gateway and print the sentences as they come.

The command around :mod:`asrd.client`: it reads its input as it comes (a live source works),
converts and resamples it chunk by chunk, handles Ctrl-C as a microphone's user expects, and
prints the results as lines or JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from typing import Any, Protocol, TextIO

import trio

from asrd import logs
from asrd.audio import InputDecoder, WavFormatError, warn_if_cut_off
from asrd.client import (
    BAD_TOKEN,
    TranscribeError,
    Transcription,
    header_safe,
    open_transcription,
    url_problem,
)
from asrd.resample import Resampler

__all__ = [
    "AHEAD_CHUNKS",
    "READ_BYTES",
    "AudioInput",
    "run_transcribe",
    "transcribe_and_print",
    "transcribe_input",
]

Event = dict[str, Any]
log = logging.getLogger(__name__)

# Rates the gateway accepts; anything else is resampled to 16 kHz before sending.
NATIVE_RATES = (8000, 16000)
_CLEAR_LINE = "\r\x1b[K"


def run_transcribe(
    file: str,
    *,
    url: str,
    token: str | None,
    appkey: str,
    realtime: bool,
    json_lines: bool,
    params: dict[str, object] | None = None,
    raw_rate: int | None = None,
) -> int:
    """``asrd transcribe FILE``: exit status 0 done, 1 transcription failed, 2 unreadable file
    or a URL that names no WebSocket server (invalid input, not a failure to retry).

    ``file`` ``-`` is stdin; with ``raw_rate`` the input is raw pcm16 mono at that rate.
    """
    if (why := url_problem(url)) is not None:
        logs.fatal(f"--url {url!r}: {why}")
        return 2
    if token is not None and not header_safe(token):
        logs.fatal(f"--token: {BAD_TOKEN}")
        return 2
    name = "stdin" if file == "-" else file
    try:
        # Unbuffered: AudioInput says why.
        f = open(0, "rb", buffering=0, closefd=False) if file == "-" else open(file, "rb", 0)
    except OSError as e:
        logs.fatal(f"cannot read {name}: {e}")
        return 2
    with f:
        return trio.run(
            partial(
                transcribe_input,
                AudioInput(f, name, raw_rate=raw_rate),
                url=url,
                token=token,
                appkey=appkey,
                realtime=realtime,
                json_lines=json_lines,
                params=params,
            )
        )


# What asrd transcribe reads at a time: what has come of a pipe or a terminal, up to this; this
# much of a file.
READ_BYTES = 1 << 16
# Chunks converted and waiting for the sender: with --realtime, a file is read no further ahead
# of what has been sent than these and the read in progress, whatever its length.
AHEAD_CHUNKS = 4


class Readable(Protocol):
    """What :class:`AudioInput` reads: an unbuffered file, or what reads as one."""

    def read(self, size: int, /) -> bytes | None: ...


class AudioInput:
    """``asrd transcribe``'s input, read as it comes: pcm16 mono at a rate the gateway takes.

    Each read runs in a thread and is one ``read`` of an unbuffered file: what has come of a
    pipe or a terminal, as much as asked of a file. Not a BufferedReader's ``read1``: a read
    left waiting as the transcription ends (Ctrl-C, a source that goes on) holds its lock, so
    closing it waits for that read, and Python's exit aborts on stdin's own. The audio is
    converted chunk by chunk (:class:`asrd.audio.InputDecoder`), and resampled to 16 kHz
    unless its rate is one the gateway takes.
    """

    def __init__(self, file: Readable, name: str, *, raw_rate: int | None = None) -> None:
        self.name = name  # for messages: "stdin" or the file's path
        self.sample_rate = 0  # of the audio as sent, once it has begun
        self.error: OSError | None = None  # a read that failed after the audio had begun
        self._file = file
        self._decoder = InputDecoder(raw_rate)
        self._resampler: Resampler | None = None
        self._first = b""  # what came with the header
        self._whole = False  # read to its end (or its data chunk's)

    async def _read(self) -> bytes:
        data = await trio.to_thread.run_sync(self._file.read, READ_BYTES, abandon_on_cancel=True)
        return data or b""  # None: a non-blocking fd with nothing yet; taken as its end

    async def begin(self) -> int:
        """Read until the audio has begun (a WAV's header has come and passed, raw bytes
        came) and return the rate it is sent at. Raises OSError, or WavFormatError for input
        that is no audio or none."""
        pcm = []
        while not self._decoder.ready:
            data = await self._read()
            if not data:
                if self._decoder.sample_rate is None and self._decoder.held:
                    raise WavFormatError("WAV ends before its data chunk")
                raise WavFormatError("it is empty")
            pcm.append(self._decoder.feed(data))
        rate = self._decoder.sample_rate or 0
        self.sample_rate = rate if rate in NATIVE_RATES else 16000
        self._resampler = Resampler(rate, self.sample_rate)
        self._first = self._resampler.process(b"".join(pcm))
        return self.sample_rate

    async def pump(self, chunks: trio.MemorySendChannel[bytes]) -> None:
        """Send the audio, from where :meth:`begin` left off, into ``chunks`` as it comes,
        and close it at the end: of the input, of a WAV's data chunk, or at a read error
        (then in :attr:`error`)."""
        assert self._resampler is not None, "begin() first"
        with chunks:
            if self._first:
                await chunks.send(self._first)
                self._first = b""
            while not self._decoder.ended:
                try:
                    data = await self._read()
                except OSError as e:
                    self.error = e
                    break
                if not data:
                    break
                if pcm := self._resampler.process(self._decoder.feed(data)):
                    await chunks.send(pcm)
            self._whole = self.error is None
            if tail := self._resampler.flush():
                await chunks.send(tail)

    @property
    def held(self) -> int:
        """Bytes of audio kept between reads (a sample frame's start, the resampler's history
        and lookahead), besides the chunks waiting for the sender: bounded, whatever the
        length of the input."""
        kept = 0 if self._resampler is None else 2 * self._resampler.held
        return self._decoder.held + kept

    @property
    def cut_off(self) -> tuple[int, int] | None:
        """(bytes of audio its header declares, bytes there were) when it was read to its end
        and there were fewer."""
        declared, received = self._decoder.declared, self._decoder.received
        if not self._whole or declared is None or received >= declared:
            return None
        return declared, received


async def transcribe_input(
    source: AudioInput,
    *,
    url: str,
    token: str | None,
    appkey: str,
    realtime: bool,
    json_lines: bool,
    params: dict[str, object] | None = None,
) -> int:
    """The body of ``asrd transcribe``: stream ``source`` as it is read and print the results.

    The connection opens once the audio has begun: input that is no audio, or none, is
    refused first (status 2). A read that fails later ends the audio there: the results for
    what came are printed, then the error, and the status is 2 (unless the transcription
    failed: 1). Ctrl-C: see :class:`_CtrlC`.
    """
    ctrl_c = _CtrlC()
    with trio.open_signal_receiver(signal.SIGINT) as signals, ctrl_c.quit:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctrl_c.watch, signals)
            status = await _transcribe_input(
                source,
                partial(
                    transcribe_and_print,
                    url=url,
                    token=token,
                    appkey=appkey,
                    realtime=realtime,
                    json_lines=json_lines,
                    params=params,
                    on_start=ctrl_c.started,
                ),
            )
            nursery.cancel_scope.cancel()
        return status
    return _INTERRUPTED


async def _transcribe_input(
    source: AudioInput, transcribe: Callable[[AsyncIterable[bytes], int], Awaitable[int]]
) -> int:
    """:func:`transcribe_input` but Ctrl-C; ``transcribe`` is :func:`transcribe_and_print`
    with its options."""
    try:
        rate = await source.begin()
    except (OSError, WavFormatError) as e:
        logs.fatal(f"cannot read {source.name}: {e}")
        return 2
    chunks_out, chunks_in = trio.open_memory_channel[bytes](AHEAD_CHUNKS)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.pump, chunks_out)
        status = await transcribe(chunks_in, rate)
        nursery.cancel_scope.cancel()  # a read still waiting (a source that goes on)
    if source.error is not None:
        logs.fatal(f"cannot read {source.name}: {source.error} (the audio sent ends there)")
        return status or 2
    if source.cut_off is not None and source.name != "stdin":
        warn_if_cut_off(source.name, source.cut_off[1], source.cut_off[0])
    return status


# The status of a command a Ctrl-C stopped: asrd.cli's INTERRUPTED_STATUS (the client does not
# import the CLI).
_INTERRUPTED = 128 + signal.SIGINT


class _CtrlC:
    """Ctrl-C in ``asrd transcribe``, for a live microphone's user: the first ends the audio
    (:meth:`Transcription.end_audio`) unless it had ended already, and the last results are
    printed, as after any end of the input; the second quits at once (:attr:`quit` is
    cancelled), without waiting for the server. Before the transcription has started,
    nothing has been sent: the first quits.

    A recorder piping into stdin from the same terminal gets the SIGINT too, and its end
    ends stdin: before it or after, the audio ends once and the results are printed.
    """

    def __init__(self) -> None:
        self.quit = trio.CancelScope()
        self._transcription: Transcription | None = None

    def started(self, transcription: Transcription) -> None:
        self._transcription = transcription

    async def watch(self, signals: AsyncIterator[int]) -> None:
        await anext(signals)
        transcription = self._transcription
        if transcription is not None:
            # After the end of the input (stdin's, a file sent whole) it cuts nothing off: only
            # the last results are still coming, and the message must not say otherwise.
            if transcription.audio_ended:
                log.info(
                    "Ctrl-C: the audio had already ended; waiting for the last results "
                    "(Ctrl-C again: quit)"
                )
            else:
                transcription.end_audio()
                log.info(
                    "Ctrl-C: the audio ends here; the last results follow (Ctrl-C again: quit)"
                )
            await anext(signals)
        self.quit.cancel()


async def transcribe_and_print(
    audio: AsyncIterable[bytes],
    sample_rate: int,
    *,
    url: str,
    token: str | None,
    appkey: str,
    realtime: bool,
    json_lines: bool,
    params: dict[str, object] | None = None,
    frame_ms: int = 100,
    on_start: Callable[[Transcription], object] | None = None,
) -> int:
    """Stream ``audio`` and print as events arrive; return 0, or 1 after a failure (on stderr).
    ``on_start`` is given the transcription once the server has started it.

    Separate from :func:`run_transcribe` so tests can run it inside their own trio loop.
    """
    out = sys.stdout
    printer: _Printer = _JsonPrinter(out) if json_lines else _TextPrinter(out, live=out.isatty())
    with _cleared_for_log_lines(printer, out, sys.stderr):
        try:
            async with open_transcription(
                url,
                audio,
                sample_rate,
                token=token,
                appkey=appkey,
                realtime=realtime,
                frame_ms=frame_ms,
                params=params,
            ) as transcription:
                if on_start is not None:
                    on_start(transcription)
                async for event in transcription:
                    printer.show(event)
        except TranscribeError as e:
            if e.event is not None:
                printer.show(e.event)
            printer.close()
            logs.fatal(f"transcription failed with status {e.code}: {e.reason}")
            return 1
        finally:
            # Also when cancelled (a second Ctrl-C quits): a partial result left on the
            # terminal would leave the shell's prompt on its line.
            printer.close()
    return 0


class _Printer:
    def show(self, event: Event) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Leave the terminal on a clean line."""


class _JsonPrinter(_Printer):
    def __init__(self, out: TextIO) -> None:
        self._out = out

    def show(self, event: Event) -> None:
        try:
            self._out.write(json.dumps(event, ensure_ascii=False) + "\n")
        except UnicodeEncodeError:  # a character our output cannot encode: JSON's \u escapes
            self._out.write(json.dumps(event) + "\n")
        self._out.flush()


class _TextPrinter(_Printer):
    """Final sentences as lines; on a terminal, the partial result on one rewritten line."""

    def __init__(self, out: TextIO, *, live: bool) -> None:
        self._out = out
        self._live = live
        self._begin_ms = 0
        self._partial_shown = False

    def show(self, event: Event) -> None:
        name = event["header"]["name"]
        payload = event.get("payload")
        if not isinstance(payload, dict):
            return
        if name == "SentenceBegin":
            self._begin_ms = _ms(payload.get("time"))
        elif name == "TranscriptionResultChanged" and self._live:
            line = _line(self._begin_ms, _ms(payload.get("time")), payload.get("result"))
            width = shutil.get_terminal_size().columns - 1
            if len(line) > width:
                line = "…" + line[len(line) - width + 1 :]
            _write(self._out, _CLEAR_LINE + line)
            self._partial_shown = True
        elif name == "SentenceEnd":
            self.close()
            begin = _ms(payload.get("begin_time", self._begin_ms))
            if payload.get("result"):
                _write(self._out, _line(begin, _ms(payload.get("time")), payload["result"]) + "\n")

    def close(self) -> None:
        if self._partial_shown:
            self._out.write(_CLEAR_LINE)
            self._out.flush()
            self._partial_shown = False


class _ClearBeforeLogLines(logging.Handler):
    """First of the root logger's handlers: the partial result on the terminal is cleared
    before the line is written, and shown again with the next result."""

    def __init__(self, printer: _Printer) -> None:
        super().__init__()
        self._printer = printer

    def emit(self, record: logging.LogRecord) -> None:
        self._printer.close()


@contextlib.contextmanager
def _cleared_for_log_lines(printer: _Printer, out: TextIO, err: TextIO | None) -> Iterator[None]:
    """Inside, a line logged while a partial result is shown starts on a clean line, when
    stdout and stderr are one terminal: it came after the partial's text, and the next
    partial's rewrite garbled it (Ctrl-C's note, a warning). Elsewhere nothing changes."""
    if not _same_terminal(out, err):
        yield
        return
    handler = _ClearBeforeLogLines(printer)
    root = logging.getLogger()
    root.handlers.insert(0, handler)  # before the one that writes the line
    try:
        yield
    finally:
        root.removeHandler(handler)


def _same_terminal(out: TextIO, err: TextIO | None) -> bool:
    if out is err:
        return out.isatty()
    try:
        return (
            err is not None
            and out.isatty()
            and err.isatty()
            and os.fstat(out.fileno()).st_rdev == os.fstat(err.fileno()).st_rdev
        )
    except (AttributeError, ValueError, OSError):  # not a file (io.UnsupportedOperation: both)
        return False


def _write(out: TextIO, text: str) -> None:
    """``text`` with what the encoding of ``out`` cannot hold (a lone surrogate, a character
    outside a legacy locale's charset) as backslash escapes, not a UnicodeEncodeError."""
    try:
        out.write(text)
    except UnicodeEncodeError:
        encoding = out.encoding or "utf-8"
        out.write(text.encode(encoding, "backslashreplace").decode(encoding))
    out.flush()


def _ms(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _line(begin_ms: int, end_ms: int, text: object) -> str:
    return f"[{begin_ms / 1000:.2f}-{end_ms / 1000:.2f}] {text if text is not None else ''}"
