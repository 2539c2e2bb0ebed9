"""Tests of asrd.audio: WAV reading of every common encoding, resampling, the stream parser."""

from __future__ import annotations

import itertools
import logging
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asrd.audio import (
    FORMAT_IEEE_FLOAT,
    FORMAT_PCM,
    MAX_HEADER_BYTES,
    InputDecoder,
    WavFormat,
    WavFormatError,
    WavStreamParser,
    read_wav_file,
    to_pcm16_mono,
)
from asrd.errors import BadWavHeader, ClientError, UnsupportedSampleRate
from asrd.resample import resample
from tests.audio_fixtures import pcm16, sine, to_array

DATA = Path(__file__).parent / "data"
REAL_WAV = DATA / "sense_and_sensibility_01_austen_64kb-0870.wav"
PCM_GUID_TAIL = b"\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"

# --- helpers ---------------------------------------------------------------------------------


def write_with_wave(path: Path, raw: bytes, *, rate: int, width: int, channels: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


def fmt_chunk(tag: int, channels: int, rate: int, bits: int, *, extensible: bool = False) -> bytes:
    block = channels * ((bits + 7) // 8)
    if not extensible:
        body = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    else:
        body = struct.pack("<HHIIHH", 0xFFFE, channels, rate, rate * block, block, bits)
        body += struct.pack("<HHI", 22, bits, 0) + struct.pack("<I", tag) + PCM_GUID_TAIL
    return b"fmt " + struct.pack("<I", len(body)) + body


def riff(*chunks: bytes, data: bytes, data_size: int | None = None) -> bytes:
    """A WAV built by hand, for what the wave module cannot write."""
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + b"".join(chunks) + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def list_chunk(payload: bytes) -> bytes:
    pad = b"\x00" if len(payload) % 2 else b""
    return b"LIST" + struct.pack("<I", len(payload)) + payload + pad


# --- read_wav_file ---------------------------------------------------------------------------


def test_real_recording_reads_unchanged() -> None:
    pcm, rate = read_wav_file(REAL_WAV)
    with wave.open(str(REAL_WAV)) as w:
        assert pcm == w.readframes(w.getnframes())
    assert rate == 16000


def test_16bit_mono_round_trip(tmp_path: Path) -> None:
    raw = pcm16(sine(440, 16000, 0.5))
    path = write_with_wave(tmp_path / "a.wav", raw, rate=16000, width=2, channels=1)
    assert read_wav_file(path) == (raw, 16000)


def test_stereo_is_mixed_to_the_mean(tmp_path: Path) -> None:
    left = np.array([1000, -2000, 32767, -32768, 3], dtype="<i2")
    right = np.array([3000, 2000, 32767, -32768, 4], dtype="<i2")
    raw = np.stack([left, right], axis=1).tobytes()
    path = write_with_wave(tmp_path / "s.wav", raw, rate=8000, width=2, channels=2)
    pcm, rate = read_wav_file(path)
    assert rate == 8000
    assert to_array(pcm).tolist() == [2000, 0, 32767, -32768, 4]  # 3.5 rounds to even


def test_8bit_unsigned(tmp_path: Path) -> None:
    raw = bytes([128, 255, 0, 192])
    path = write_with_wave(tmp_path / "u8.wav", raw, rate=16000, width=1, channels=1)
    pcm, _ = read_wav_file(path)
    assert to_array(pcm).tolist() == [0, 127 * 256, -32768, 64 * 256]


def test_24bit(tmp_path: Path) -> None:
    values = [0x123456, -0x123456, 0x7FFFFF, -0x800000, 0x80]
    raw = b"".join(v.to_bytes(3, "little", signed=True) for v in values)
    path = write_with_wave(tmp_path / "24.wav", raw, rate=16000, width=3, channels=1)
    pcm, _ = read_wav_file(path)
    assert to_array(pcm).tolist() == [0x1234, -0x1234, 32767, -32768, 0]


def test_32bit_int_stereo(tmp_path: Path) -> None:
    raw = np.array([[0x10000000, 0x30000000], [-(2**31), -(2**31)]], dtype="<i4").tobytes()
    path = write_with_wave(tmp_path / "32.wav", raw, rate=22050, width=4, channels=2)
    pcm, rate = read_wav_file(path)
    assert (to_array(pcm).tolist(), rate) == ([0x2000, -32768], 22050)


@pytest.mark.parametrize("extensible", [False, True])
@pytest.mark.parametrize("dtype", ["<f4", "<f8"])
def test_float(tmp_path: Path, extensible: bool, dtype: str) -> None:
    x = np.array([0.0, 0.5, -0.5, 1.5, -1.5, np.nan], dtype=dtype)
    bits = 8 * x.itemsize
    path = tmp_path / "f.wav"
    path.write_bytes(
        riff(fmt_chunk(FORMAT_IEEE_FLOAT, 1, 16000, bits, extensible=extensible), data=x.tobytes())
    )
    pcm, rate = read_wav_file(path)
    assert rate == 16000
    assert to_array(pcm).tolist() == [0, 16384, -16384, 32767, -32768, 0]


def test_float32_stereo_44100(tmp_path: Path) -> None:
    left, right = sine(1000, 44100, 0.25), sine(1000, 44100, 0.25) * 0.5
    interleaved = np.stack([left, right], axis=1).astype("<f4")
    path = tmp_path / "f.wav"
    path.write_bytes(riff(fmt_chunk(FORMAT_IEEE_FLOAT, 2, 44100, 32), data=interleaved.tobytes()))
    pcm, rate = read_wav_file(path)
    assert rate == 44100
    expected = pcm16(((left + right) / 2).astype(np.float32).astype(np.float64))
    assert np.abs(to_array(pcm).astype(int) - to_array(expected)).max() <= 1


def test_extensible_pcm_with_list_chunk(tmp_path: Path) -> None:
    raw = np.array([[100, 300], [-5, -7]], dtype="<i2").tobytes()
    path = tmp_path / "x.wav"
    path.write_bytes(
        riff(list_chunk(b"INFOodd"), fmt_chunk(FORMAT_PCM, 2, 48000, 16, extensible=True), data=raw)
    )
    assert read_wav_file(path) == (np.array([200, -6], dtype="<i2").tobytes(), 48000)


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF])
def test_streaming_writer_sizes_mean_until_the_end(tmp_path: Path, size: int) -> None:
    raw = pcm16(sine(300, 8000, 0.1))
    path = tmp_path / "stream.wav"
    path.write_bytes(riff(fmt_chunk(FORMAT_PCM, 1, 8000, 16), data=raw, data_size=size))
    assert read_wav_file(path) == (raw, 8000)


def test_a_cut_off_file_is_read_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = pcm16(sine(440, 16000, 0.5))
    path = write_with_wave(tmp_path / "cut.wav", raw, rate=16000, width=2, channels=1)
    path.write_bytes(path.read_bytes()[:-1000])  # an interrupted copy
    with caplog.at_level("WARNING", logger="asrd.audio"):
        pcm, rate = read_wav_file(path)
    assert (pcm, rate) == (raw[:-1000], 16000)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: the WAV header declares 16000 bytes of audio, the file holds 15000: "
        "reading what is there"
    ]


def test_a_cut_off_float_file_is_read_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x = np.array([0.5, -0.5, 0.25], dtype="<f4")
    path = tmp_path / "f.wav"
    path.write_bytes(
        riff(fmt_chunk(FORMAT_IEEE_FLOAT, 1, 16000, 32), data=x.tobytes(), data_size=40)
    )
    with caplog.at_level("WARNING", logger="asrd.audio"):
        pcm, _ = read_wav_file(path)
    assert to_array(pcm).tolist() == [16384, -16384, 8192]
    assert "declares 40 bytes of audio, the file holds 12" in caplog.text


def test_a_whole_file_gives_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="asrd.audio"):
        read_wav_file(REAL_WAV)
    assert caplog.records == []


def test_44100_file_resampled_to_16000_keeps_its_tone(tmp_path: Path) -> None:
    raw = pcm16(sine(1000, 44100, 1.0))
    path = write_with_wave(tmp_path / "cd.wav", raw, rate=44100, width=2, channels=1)
    pcm, rate = read_wav_file(path)
    out = to_array(resample(pcm, rate, 16000)).astype(np.float64)
    assert len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out))
    assert np.argmax(spectrum) == 1000  # 1 Hz bins over one second


def test_not_a_wav(tmp_path: Path) -> None:
    path = tmp_path / "t.wav"
    path.write_bytes(b"hello, this is not audio at all")
    with pytest.raises(WavFormatError, match="not a RIFF/WAVE"):
        read_wav_file(path)
    assert issubclass(WavFormatError, ValueError)


@pytest.mark.parametrize(
    ("tag", "bits"), [(2, 4), (FORMAT_IEEE_FLOAT, 16), (FORMAT_PCM, 40), (0x55, 16)]
)
def test_unsupported_encodings(tmp_path: Path, tag: int, bits: int) -> None:
    path = tmp_path / "u.wav"
    path.write_bytes(riff(fmt_chunk(tag, 1, 16000, bits), data=b"\x00" * 64))
    with pytest.raises(WavFormatError, match="unsupported"):
        read_wav_file(path)


@pytest.mark.parametrize("read_by", ["wave", "own parser"])
def test_a_sample_rate_no_recording_has_is_refused(tmp_path: Path, read_by: str) -> None:
    """Resampling 1000 samples from 1 GHz took seconds and gigabytes for its filter."""
    path = tmp_path / "r.wav"
    for rate in (768_000, 10**9):
        if read_by == "wave":
            write_with_wave(path, b"\x00\x00" * 1000, rate=rate, width=2, channels=1)
        else:  # float: `wave` refuses it
            path.write_bytes(riff(fmt_chunk(FORMAT_IEEE_FLOAT, 1, rate, 32), data=bytes(4000)))
        if rate == 768_000:
            assert read_wav_file(path)[1] == rate
        else:
            with pytest.raises(WavFormatError, match="sample rate of 1000000000 Hz"):
                read_wav_file(path)


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "t.wav"
    path.write_bytes(riff(fmt_chunk(FORMAT_PCM, 1, 16000, 16), data=b"")[:30])
    with pytest.raises(WavFormatError):
        read_wav_file(path)


def test_missing_file_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_wav_file(tmp_path / "nope.wav")


# --- InputDecoder (asrd transcribe's input as it comes) --------------------------------------


def decode(decoder: InputDecoder, data: bytes, cuts: list[int]) -> bytes:
    out = b""
    bounds = [0, *sorted(cuts), len(data)]
    for a, b in itertools.pairwise(bounds):
        out += decoder.feed(data[a:b])
    return out


def test_a_stream_wav_ends_with_the_stream_whatever_its_header_says(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A writer to a pipe cannot go back to fill in the sizes: a guess stays there."""
    raw = np.array([[0.5, -0.5], [0.25, 0.75]], dtype="<f4").tobytes()
    wav = riff(fmt_chunk(FORMAT_IEEE_FLOAT, 2, 44100, 32), data=raw, data_size=0xFFFFFFFF)
    decoder = InputDecoder()
    with caplog.at_level(logging.WARNING):
        assert to_array(decoder.feed(wav)).tolist() == [0, 16384]
    assert (decoder.sample_rate, decoder.ended, decoder.declared) == (44100, False, None)
    assert caplog.records == []


def test_a_stream_wav_ends_at_its_data_size() -> None:
    data = struct.pack("<3h", 1, 2, 3)
    wav = riff(fmt_chunk(FORMAT_PCM, 1, 8000, 16), data=data, data_size=4) + b"LIST\0\0\0\0"
    decoder = InputDecoder()
    assert decoder.feed(wav[:-6]) == data[:4]
    assert decoder.ended and (decoder.declared, decoder.received) == (4, 4)
    assert decoder.feed(wav[-6:]) == b""


def test_raw_input_keeps_an_odd_byte_for_the_next_chunk() -> None:
    decoder = InputDecoder(raw_rate=11025)
    assert (decoder.sample_rate, decoder.ready) == (11025, False)  # no byte yet
    assert decoder.feed(b"\x01\x00\x02\x00\x03") == b"\x01\0\x02\0"
    assert decoder.ready and decoder.held == 1
    assert decoder.feed(b"\x00") == b"\x03\0"


def test_a_wav_is_ready_once_its_header_has_come() -> None:
    """Before a byte of its audio: the connection opens once the header has passed."""
    wav = riff(fmt_chunk(FORMAT_PCM, 2, 44100, 24), data=b"", data_size=0)
    decoder = InputDecoder()
    assert decoder.feed(wav[:-1]) == b"" and not decoder.ready and decoder.held == len(wav) - 1
    assert decoder.feed(wav[-1:]) == b"" and decoder.ready and decoder.held == 0


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"RIFX\0\0\0\0WAVE", "not a RIFF/WAVE stream"),
        (riff(fmt_chunk(2, 1, 16000, 4), data=b""), "unsupported WAV encoding: format tag 2"),
        (riff(fmt_chunk(FORMAT_PCM, 1, 800_000, 16), data=b""), "sample rate of 800000 Hz"),
    ],
    ids=["not-riff", "adpcm", "800khz"],
)
def test_a_stream_header_is_refused_once_it_has_come(head: bytes, why: str) -> None:
    """Not after the whole stream: it may never end (a recorder, without --raw-rate)."""
    with pytest.raises(WavFormatError, match=why):
        InputDecoder().feed(head)


def test_a_header_is_kept_up_to_a_bound() -> None:
    """The header is kept until it is whole: a stream of chunks before any data chunk (no WAV a
    program writes) is refused, not kept for ever."""
    decoder = InputDecoder()
    decoder.feed(riff(fmt_chunk(FORMAT_PCM, 1, 16000, 16), data=b"")[:36])
    decoder.feed(list_chunk(bytes(MAX_HEADER_BYTES - 100)))
    with pytest.raises(WavFormatError, match="no WAV data chunk in its first 16 MiB"):
        decoder.feed(b"JUNK" + bytes(200))


STEREO_24 = riff(
    list_chunk(b"INFOISFT\x05\x00\x00\x00asrd\x00"),
    fmt_chunk(FORMAT_PCM, 2, 44100, 24, extensible=True),
    data=np.random.default_rng(5).integers(0, 256, 6 * 200, dtype=np.uint8).tobytes(),
)
STEREO_24_PCM = to_pcm16_mono(STEREO_24[-6 * 200 :], sample_width=3, channels=2)


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STEREO_24)), max_size=12))
def test_any_splitting_of_the_input_gives_the_same_audio(cuts: list[int]) -> None:
    """A frame of two 3-byte samples cut anywhere waits for its rest; nothing more is kept."""
    decoder = InputDecoder()
    assert decode(decoder, STEREO_24, cuts) == STEREO_24_PCM
    assert decoder.held == 0


# --- to_pcm16_mono ------------------------------------------------------------------------------


def test_partial_trailing_frame_is_dropped() -> None:
    assert to_pcm16_mono(b"\x01\x00\x03\x00\x05", sample_width=2, channels=2) == b"\x02\x00"
    assert to_pcm16_mono(b"\x01\x00\x03", sample_width=2, channels=1) == b"\x01\x00"


@pytest.mark.parametrize(("width", "is_float"), [(0, False), (5, False), (2, True), (3, True)])
def test_bad_sample_width(width: int, is_float: bool) -> None:
    with pytest.raises(WavFormatError):
        to_pcm16_mono(b"\x00" * 16, sample_width=width, channels=1, is_float=is_float)


# --- WavStreamParser ---------------------------------------------------------------------------

REAL_BYTES = REAL_WAV.read_bytes()
REAL_HEADER = 44  # plain 16-byte fmt chunk, then data (checked in the first test)


def test_real_header_in_one_feed() -> None:
    parser = WavStreamParser(16000)
    assert parser.format is None
    chunk = REAL_BYTES[:10_000]
    assert parser.feed(chunk) == chunk[REAL_HEADER:]
    assert parser.format == WavFormat(FORMAT_PCM, 1, 16000, 16)
    assert parser.feed(b"\x01\x02") == b"\x01\x02"


def feed_split(parser: WavStreamParser, data: bytes, cuts: list[int]) -> bytes:
    out = b""
    bounds = [0, *sorted(cuts), len(data)]
    for a, b in itertools.pairwise(bounds):
        out += parser.feed(data[a:b])
    return out


def test_every_single_split_point_of_the_real_header() -> None:
    data = REAL_BYTES[:200]
    for cut in range(len(data) + 1):
        assert feed_split(WavStreamParser(16000), data, [cut]) == data[REAL_HEADER:], cut


LISTED = riff(
    list_chunk(b"INFOISFT\x05\x00\x00\x00asrd\x00"),
    fmt_chunk(FORMAT_PCM, 1, 8000, 16, extensible=True),
    b"fact" + struct.pack("<II", 4, 40),
    data=bytes(range(80)),
)


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(LISTED)), max_size=12))
def test_any_splitting_gives_the_same_payload(cuts: list[int]) -> None:
    assert feed_split(WavStreamParser(8000), LISTED, cuts) == bytes(range(80))


@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_any_splitting_of_the_real_file(cuts: list[int]) -> None:
    data = REAL_BYTES[:400]
    out = feed_split(WavStreamParser(16000), data, cuts)
    assert out == data[REAL_HEADER:]


def test_payload_is_whole_samples() -> None:
    parser = WavStreamParser(8000)
    assert parser.feed(riff(fmt_chunk(FORMAT_PCM, 1, 8000, 16), data=b"", data_size=0)) == b""
    assert parser.feed(b"\x01") == b""
    assert parser.feed(b"\x02\x03") == b"\x01\x02"
    assert parser.feed(b"\x04\x05\x06") == b"\x03\x04\x05\x06"


def test_bytes_after_a_sized_data_chunk_are_ignored() -> None:
    wav = riff(fmt_chunk(FORMAT_PCM, 1, 16000, 16), data=b"abcd") + list_chunk(b"INFOtail")
    parser = WavStreamParser(16000)
    assert parser.feed(wav[:-3]) == b"abcd"
    assert parser.feed(wav[-3:]) == b""


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF])
def test_stream_writer_sizes_are_unbounded(size: int) -> None:
    parser = WavStreamParser(16000)
    header = riff(fmt_chunk(FORMAT_PCM, 1, 16000, 16), data=b"", data_size=size)
    assert parser.feed(header + b"ab") == b"ab"
    assert parser.feed(b"\x00" * 100_000) == b"\x00" * 100_000


@pytest.mark.parametrize(
    ("wav", "message"),
    [
        (b"\x00\x01" * 40, "not a RIFF/WAVE"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "not a RIFF/WAVE"),
        (riff(fmt_chunk(FORMAT_IEEE_FLOAT, 1, 16000, 32), data=b""), "IEEE float"),
        (riff(fmt_chunk(0x55, 1, 16000, 16), data=b""), "need PCM"),
        (riff(fmt_chunk(FORMAT_PCM, 1, 16000, 8), data=b""), "8-bit PCM: need 16-bit"),
        (riff(fmt_chunk(FORMAT_PCM, 1, 16000, 24), data=b""), "24-bit"),
        (riff(fmt_chunk(FORMAT_PCM, 2, 16000, 16), data=b""), "2 channels: need mono"),
        (riff(data=b"\x00\x00"), "data chunk comes before the fmt chunk"),
        (riff(b"fmt \x04\x00\x00\x00\x01\x00\x01\x00", data=b""), "fmt chunk too short"),
        (riff(list_chunk(b"x" * 5000), fmt_chunk(1, 1, 16000, 16), data=b""), "larger than 4096"),
    ],
)
def test_bad_headers(wav: bytes, message: str) -> None:
    parser = WavStreamParser(16000)
    with pytest.raises(BadWavHeader, match=message) as info:
        parser.feed(wav)
    assert info.value.code == 40000009
    with pytest.raises(BadWavHeader):  # stays failed
        parser.feed(b"\x00\x00")


def test_not_riff_is_noticed_on_the_first_bytes() -> None:
    with pytest.raises(BadWavHeader):
        WavStreamParser(16000).feed(b"\x10\x00")


def test_header_limit_with_tiny_frames() -> None:
    wav = riff(list_chunk(b"y" * 300), fmt_chunk(FORMAT_PCM, 1, 16000, 16), data=b"")
    parser = WavStreamParser(16000, max_header_bytes=256)
    with pytest.raises(BadWavHeader, match="larger than 256"):
        for i in range(len(wav)):
            parser.feed(wav[i : i + 1])
    assert i == 255  # raised as soon as the limit was reached
    # Exactly at the limit is fine.
    assert WavStreamParser(16000, max_header_bytes=len(wav)).feed(wav + b"zz") == b"zz"


def test_sample_rate_mismatch_is_its_own_error() -> None:
    header = riff(fmt_chunk(FORMAT_PCM, 1, 8000, 16), data=b"")
    with pytest.raises(UnsupportedSampleRate, match=r"8000 Hz differs .* 16000") as info:
        WavStreamParser(16000).feed(header)
    assert info.value.code == 41010101
    assert isinstance(info.value, ClientError)
