"""Audio utilities: WAV reading, sample conversion and incremental WAV parsers
(resampling: :mod:`asrd.resample`).

Everything here is pure (no I/O except :func:`read_wav_file`) so the gateway can run it on
every audio frame and tests can drive it synchronously. The canonical audio of asrd is 16-bit
little-endian mono PCM ("pcm16"), the only thing engines consume.
"""

from __future__ import annotations

import logging
import os
import struct
import wave
from dataclasses import dataclass
from typing import Final, NoReturn

import numpy as np
import numpy.typing as npt

from asrd.errors import BadWavHeader, UnsupportedSampleRate

__all__ = [
    "FORMAT_IEEE_FLOAT",
    "FORMAT_PCM",
    "MAX_FILE_RATE",
    "MAX_HEADER_BYTES",
    "InputDecoder",
    "WavFormat",
    "WavFormatError",
    "WavStreamParser",
    "read_wav_file",
    "to_pcm16_mono",
    "warn_if_cut_off",
]

FORMAT_PCM: Final = 1
FORMAT_IEEE_FLOAT: Final = 3
_FORMAT_EXTENSIBLE: Final = 0xFFFE
# KSDATAFORMAT_SUBTYPE_* GUIDs are the format tag as a uint32 followed by these 12 bytes.
_SUBFORMAT_GUID_TAIL: Final = b"\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
# Data chunk sizes that streaming writers put before they know the length.
_UNKNOWN_SIZES: Final = (0, 0xFFFFFFFF)
_BLOCK_FRAMES: Final = 1 << 20  # frames converted per numpy pass, bounds temporary memory
# The highest rate a file is read at: audio interfaces record at up to 768 kHz. Above it is a
# broken header, and resampling from it would take a filter of millions of taps per sample.
MAX_FILE_RATE: Final = 768_000
# The most of a WAV kept before its data chunk (fmt, LIST, bext, iXML, padding) while it is
# read as it comes: it must be whole to be parsed. The audio after it is never kept.
MAX_HEADER_BYTES: Final = 16 << 20

FloatArray = npt.NDArray[np.float64]

log = logging.getLogger(__name__)


class WavFormatError(ValueError):
    """A file or stream is not audio we can read; the message says why."""


@dataclass(frozen=True, slots=True)
class WavFormat:
    """The ``fmt`` chunk, with WAVE_FORMAT_EXTENSIBLE resolved to its sub-format tag."""

    format_tag: int  # FORMAT_PCM or FORMAT_IEEE_FLOAT (others are rejected later)
    channels: int
    sample_rate: int
    bits_per_sample: int

    @property
    def sample_width(self) -> int:
        """Bytes per sample of one channel (24-bit → 3, 20-bit-in-24 → 3)."""
        return (self.bits_per_sample + 7) // 8


@dataclass(frozen=True, slots=True)
class _Header:
    fmt: WavFormat
    data_offset: int  # where the sample bytes start
    data_size: int | None  # None: until the end of the file or stream


def _parse_header(buf: bytes | bytearray) -> _Header | None:
    """Parse RIFF chunks up to the start of ``data``; ``None`` if ``buf`` ends before that.

    Shared by the file reader and the stream parser so both accept exactly the same headers.
    Raises :class:`WavFormatError` as soon as the prefix seen cannot be a WAV.
    """
    head = bytes(buf[:12])
    if not (head[:4] == b"RIFF"[: len(head[:4])] and head[8:] == b"WAVE"[: len(head[8:])]):
        raise WavFormatError(f"not a RIFF/WAVE stream (starts with {head!r})")
    pos = 12
    fmt: WavFormat | None = None
    while pos + 8 <= len(buf):
        chunk_id = bytes(buf[pos : pos + 4])
        (size,) = struct.unpack_from("<I", buf, pos + 4)
        if chunk_id == b"data":
            if fmt is None:
                raise WavFormatError("WAV data chunk comes before the fmt chunk")
            return _Header(fmt, pos + 8, None if size in _UNKNOWN_SIZES else size)
        if chunk_id == b"fmt ":
            if pos + 8 + size > len(buf):
                return None
            fmt = _parse_fmt(bytes(buf[pos + 8 : pos + 8 + size]))
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    return None


def _parse_fmt(body: bytes) -> WavFormat:
    if len(body) < 16:
        raise WavFormatError(f"WAV fmt chunk too short ({len(body)} bytes)")
    tag, channels, rate, _byte_rate, _block_align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _FORMAT_EXTENSIBLE:
        if len(body) < 40:
            raise WavFormatError(f"WAVE_FORMAT_EXTENSIBLE fmt chunk too short ({len(body)} bytes)")
        (tag,) = struct.unpack_from("<I", body, 24)
        if body[28:40] != _SUBFORMAT_GUID_TAIL:
            raise WavFormatError("WAVE_FORMAT_EXTENSIBLE with an unknown sub-format GUID")
    if channels == 0 or rate == 0 or bits == 0:
        raise WavFormatError(f"WAV fmt chunk has {channels} channels, {rate} Hz, {bits} bits")
    return WavFormat(tag, channels, rate, bits)


def read_wav_file(path: str | os.PathLike[str]) -> tuple[bytes, int]:
    """Read a PCM (8/16/24/32-bit int) or IEEE-float WAV; return (pcm16 mono, sample rate).

    ``wave`` reads plain integer PCM; float, WAVE_FORMAT_EXTENSIBLE and streaming-writer
    files (data size 0) go through our own chunk parser. OSError propagates unchanged.
    """
    try:
        with wave.open(os.fspath(path), "rb") as w:
            nframes = w.getnframes()
            if nframes > 0:
                _check_rate(w.getframerate())
                raw = w.readframes(nframes)
                warn_if_cut_off(path, len(raw), nframes * w.getsampwidth() * w.getnchannels())
                pcm = to_pcm16_mono(raw, sample_width=w.getsampwidth(), channels=w.getnchannels())
                return pcm, w.getframerate()
    except (wave.Error, EOFError):
        pass
    with open(path, "rb") as f:
        content = f.read()
    fmt, raw, declared = _wav_data(content)
    if declared is not None:
        warn_if_cut_off(path, len(raw), declared)
    return _wav_pcm(fmt, raw), fmt.sample_rate


def _wav_data(content: bytes) -> tuple[WavFormat, bytes, int | None]:
    """The format of a WAV in ``content``, its audio bytes, and the data size its header
    declares (None: unknown)."""
    header = _parse_header(content)
    if header is None:
        raise WavFormatError("WAV ends before its data chunk")
    _check_format(header.fmt)
    end = None if header.data_size is None else header.data_offset + header.data_size
    return header.fmt, content[header.data_offset : end], header.data_size


def _check_format(fmt: WavFormat) -> None:
    _check_rate(fmt.sample_rate)
    if (fmt.format_tag, fmt.sample_width) not in {
        (FORMAT_PCM, 1),
        (FORMAT_PCM, 2),
        (FORMAT_PCM, 3),
        (FORMAT_PCM, 4),
        (FORMAT_IEEE_FLOAT, 4),
        (FORMAT_IEEE_FLOAT, 8),
    }:
        raise WavFormatError(
            f"unsupported WAV encoding: format tag {fmt.format_tag}, {fmt.bits_per_sample} bits"
        )


def _wav_pcm(fmt: WavFormat, raw: bytes) -> bytes:
    return to_pcm16_mono(
        raw,
        sample_width=fmt.sample_width,
        channels=fmt.channels,
        is_float=fmt.format_tag == FORMAT_IEEE_FLOAT,
    )


def _check_rate(rate: int) -> None:
    if not 0 < rate <= MAX_FILE_RATE:  # `wave` reads a rate of 0; _parse_fmt refuses it
        raise WavFormatError(
            f"the WAV header gives a sample rate of {rate} Hz (at most {MAX_FILE_RATE} Hz)"
        )


def warn_if_cut_off(path: str | os.PathLike[str], got: int, declared: int) -> None:
    """Warn about a cut-off file: its audio is still read, but the user may not know it ends
    early (an interrupted copy or recording)."""
    if got < declared:
        log.warning(
            "%s: the WAV header declares %d bytes of audio, the file holds %d: "
            "reading what is there",
            os.fspath(path),
            declared,
            got,
        )


def to_pcm16_mono(raw: bytes, *, sample_width: int, channels: int, is_float: bool = False) -> bytes:
    """Convert interleaved little-endian samples to pcm16 mono by averaging the channels.

    ``sample_width`` is in bytes: 1 (unsigned, as WAV stores 8-bit), 2, 3, 4 for integers;
    4 or 8 for floats in [-1, 1] (clipped). A trailing partial frame is dropped.
    """
    if not (sample_width in (4, 8) if is_float else 1 <= sample_width <= 4):
        kind = "float" if is_float else "integer"
        raise WavFormatError(f"unsupported sample format: {sample_width * 8}-bit {kind}")
    if channels < 1:
        raise WavFormatError(f"invalid channel count {channels}")
    frame = sample_width * channels
    usable = len(raw) - len(raw) % frame
    if sample_width == 2 and channels == 1 and not is_float:
        return raw[:usable]
    out = bytearray()
    step = _BLOCK_FRAMES * frame
    for start in range(0, usable, step):
        samples = _decode(raw[start : min(start + step, usable)], sample_width, is_float)
        out += _encode_pcm16(samples.reshape(-1, channels).mean(axis=1))
    return bytes(out)


class InputDecoder:
    """Sans-IO: ``asrd transcribe``'s input as it comes, in chunks of any size, to pcm16 mono.

    A WAV of any encoding :func:`read_wav_file` reads, or with ``raw_rate`` raw pcm16 mono at
    that rate. A WAV header is checked as soon as it has come, not after all of the input: a
    stream may never end (a recorder, without ``--raw-rate``). The audio ends where the
    header's data size or the input does, whichever comes first: a writer to a pipe cannot go
    back to fill in the size, and leaves a guess there. Between chunks it keeps only the
    header until it is whole, then the part of a sample frame cut off at a chunk's end.
    """

    def __init__(self, raw_rate: int | None = None) -> None:
        self._raw = raw_rate is not None
        self._format = None if raw_rate is None else WavFormat(FORMAT_PCM, 1, raw_rate, 16)
        self._header = bytearray()
        self._remaining: int | None = None  # data bytes still to come; None: to the end
        self._carry = b""  # the start of a sample frame
        self.declared: int | None = None  # the data size the header gives, if it gives one
        self.received = 0  # data bytes that came (a raw input is all data)

    @property
    def sample_rate(self) -> int | None:
        """The audio's rate, once known."""
        return None if self._format is None else self._format.sample_rate

    @property
    def ready(self) -> bool:
        """The audio has begun: a WAV's header has come whole and passed, or raw bytes came."""
        return self._format is not None and (self.received > 0 or not self._raw)

    @property
    def ended(self) -> bool:
        """The header's data size has come: what follows is no audio."""
        return self._remaining == 0

    @property
    def held(self) -> int:
        """Bytes kept between chunks."""
        return len(self._header) + len(self._carry)

    def feed(self, data: bytes) -> bytes:
        """The pcm16 mono that ``data``, the next bytes of the input, completes (maybe none).

        Raises :class:`WavFormatError` for a header that cannot be read.
        """
        if self._format is None:
            self._header += data
            header = _parse_header(self._header)
            if header is None:
                if len(self._header) > MAX_HEADER_BYTES:
                    raise WavFormatError(
                        f"no WAV data chunk in its first {MAX_HEADER_BYTES >> 20} MiB"
                    )
                return b""
            _check_format(header.fmt)
            data = bytes(self._header[header.data_offset :])
            self._header = bytearray()
            self._format = header.fmt
            self._remaining = self.declared = header.data_size
        if self._remaining is not None:
            data = data[: self._remaining]
            self._remaining -= len(data)
        self.received += len(data)
        if self._carry:
            data = self._carry + data
        frame = self._format.sample_width * self._format.channels
        whole = len(data) - len(data) % frame
        self._carry = data[whole:]
        return _wav_pcm(self._format, data[:whole])


def _decode(raw: bytes, width: int, is_float: bool) -> FloatArray:
    """Samples as float64 in [-1, 1)."""
    if is_float:
        x = np.frombuffer(raw, dtype="<f4" if width == 4 else "<f8").astype(np.float64)
        return np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    if width == 1:
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
    if width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return ((v ^ 0x800000) - 0x800000).astype(np.float64) / float(1 << 23)
    return np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)


def _encode_pcm16(x: FloatArray) -> bytes:
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype("<i2").tobytes()


class WavStreamParser:
    """Sans-IO parser for a session that declared ``format: "wav"``.

    Feed it the client's binary frames in order; it validates the header (which may arrive
    split over any number of frames) and returns the PCM payload. The header must be 16-bit
    PCM mono at the declared rate, since the gateway does not convert client audio. Unknown
    chunks (LIST, fact, ...) before ``data`` are skipped; bytes after a sized ``data`` chunk
    are ignored. Returned payloads are whole samples: an odd trailing byte is held back
    until the next feed. After an error, every further ``feed`` raises it again.
    """

    def __init__(self, sample_rate: int, *, max_header_bytes: int = 4096) -> None:
        self._sample_rate = sample_rate
        self._max_header_bytes = max_header_bytes
        self._header_buf = bytearray()
        self._format: WavFormat | None = None
        self._remaining: int | None = None  # payload bytes still expected; None: unbounded
        self._carry = b""  # an odd byte waiting for its other half
        self._error: BadWavHeader | UnsupportedSampleRate | None = None

    @property
    def format(self) -> WavFormat | None:
        """The validated ``fmt`` once the whole header has arrived, else ``None``."""
        return self._format

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return the payload bytes it completed (possibly empty)."""
        if self._error is not None:
            raise self._error
        if self._format is None:
            self._header_buf += data
            header = self._parse_or_fail()
            if header is None:
                return b""
            data = bytes(self._header_buf[header.data_offset :])
            self._header_buf = bytearray()
            self._remaining = header.data_size
            self._format = header.fmt
        return self._take_payload(data)

    def _parse_or_fail(self) -> _Header | None:
        try:
            header = _parse_header(self._header_buf)
        except WavFormatError as e:
            self._fail(BadWavHeader(str(e)))
        too_big = f"WAV header larger than {self._max_header_bytes} bytes (no data chunk yet)"
        if header is None:
            if len(self._header_buf) >= self._max_header_bytes:
                self._fail(BadWavHeader(too_big))
            return None
        if header.data_offset > self._max_header_bytes:
            self._fail(BadWavHeader(too_big))
        fmt = header.fmt
        if fmt.format_tag != FORMAT_PCM:
            kind = "IEEE float" if fmt.format_tag == FORMAT_IEEE_FLOAT else "compressed"
            self._fail(BadWavHeader(f"WAV format tag {fmt.format_tag} ({kind}): need PCM"))
        if fmt.bits_per_sample != 16:
            self._fail(BadWavHeader(f"WAV is {fmt.bits_per_sample}-bit PCM: need 16-bit"))
        if fmt.channels != 1:
            self._fail(BadWavHeader(f"WAV has {fmt.channels} channels: need mono"))
        if fmt.sample_rate != self._sample_rate:
            self._fail(
                UnsupportedSampleRate(
                    f"WAV sample rate {fmt.sample_rate} Hz differs from the declared "
                    f"sample_rate {self._sample_rate}"
                )
            )
        return header

    def _fail(self, error: BadWavHeader | UnsupportedSampleRate) -> NoReturn:
        self._error = error
        self._header_buf = bytearray()
        raise error

    def _take_payload(self, data: bytes) -> bytes:
        if self._remaining is not None:
            data = data[: self._remaining]
            self._remaining -= len(data)
        if self._carry:
            data = self._carry + data
        cut = len(data) & ~1
        self._carry = data[cut:]
        return data[:cut]
