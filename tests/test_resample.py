"""asrd.resample: the one sample-rate converter, for the engine's 8 kHz sessions and for
``asrd transcribe``'s input at any rate. Its output must not depend on how the stream is cut,
keep the speech band, remove what would alias, and take bounded memory."""

from __future__ import annotations

import math
import random
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

from asrd.resample import Resampler, output_length, resample
from tests.audio_fixtures import pcm16, sine, to_array

RATE_PAIRS = [(8000, 16000), (16000, 8000), (44100, 16000), (22050, 16000), (16000, 16000)]


def _noise(n: int, seed: int = 7) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 4000).astype("<i2").tobytes()


@pytest.mark.parametrize(("src", "dst"), RATE_PAIRS)
def test_resampler_chunking_is_invisible(src: int, dst: int) -> None:
    pcm = _noise(src // 2 + 1)  # an odd number of samples
    whole = resample(pcm, src, dst)
    assert len(whole) // 2 == output_length(len(pcm) // 2, src, dst)
    rnd = random.Random(src * 31 + dst)
    for _ in range(5):
        r = Resampler(src, dst)
        out = []
        i = 0
        while i < len(pcm):
            n = rnd.choice([1, 2, 3, 7, 160, 333, 1601, 4099])
            out.append(r.process(pcm[i : i + n]))
            i += n
        out.append(r.flush())
        assert b"".join(out) == whole


def _tone(freq: float, rate: int, seconds: float, amplitude: float = 10000.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return np.rint(amplitude * np.sin(2 * math.pi * freq * t)).astype("<i2").tobytes()


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3400.0])
def test_upsampling_keeps_speech_band_tones(freq: float) -> None:
    up = np.frombuffer(resample(_tone(freq, 8000, 0.5), 8000, 16000), dtype="<i2")
    expected = np.frombuffer(_tone(freq, 16000, 0.5), dtype="<i2").astype(np.float64)
    inner = slice(200, -200)  # away from the zero padding at both ends
    error = np.abs(up[inner] - expected[inner])
    assert error.max() < 0.01 * 10000


def test_downsampling_rejects_what_would_alias() -> None:
    down = np.frombuffer(resample(_tone(6000.0, 16000, 0.5), 16000, 8000), dtype="<i2")
    assert np.sqrt(np.mean(down[100:-100].astype(np.float64) ** 2)) < 10


def test_resampler_keeps_dc_and_edges() -> None:
    dc = np.full(4000, 1234, dtype="<i2").tobytes()
    up = np.frombuffer(resample(dc, 8000, 16000), dtype="<i2")
    assert len(up) == 8000
    assert np.all(up[100:-100] == 1234)  # away from the zero padding at both ends
    assert resample(b"", 8000, 16000) == b""
    assert resample(b"\x01", 8000, 16000) == b""
    assert resample(b"\x01\x02\x03", 16000, 16000) == b"\x01\x02"


def test_resampler_misuse() -> None:
    with pytest.raises(ValueError):
        Resampler(0, 16000)
    r = Resampler(8000, 16000)
    assert r.lookahead > 0
    r.process(b"\x00\x01" * 100)
    tail = r.flush()
    assert tail
    assert r.flush() == b""
    with pytest.raises(RuntimeError):
        r.process(b"\0\0")


def rms_db(pcm: bytes, reference: float) -> float:
    x = to_array(pcm).astype(np.float64)[200:-200]  # skip the filter's edges
    return float(20 * np.log10(np.sqrt(np.mean(x**2)) / reference + 1e-12))


@pytest.mark.parametrize(("from_rate", "to_rate"), [(44100, 16000), (48000, 16000), (16000, 8000)])
def test_downsampling_keeps_the_passband_and_removes_aliases(from_rate: int, to_rate: int) -> None:
    reference = 0.5 * 32768 / np.sqrt(2)
    passband = resample(pcm16(sine(0.25 * to_rate, from_rate)), from_rate, to_rate)
    assert len(passband) // 2 == to_rate
    assert abs(rms_db(passband, reference)) < 0.5
    # Above the new Nyquist frequency: would alias to 0.4 * to_rate without the low-pass.
    alias = resample(pcm16(sine(0.6 * to_rate, from_rate)), from_rate, to_rate)
    assert rms_db(alias, reference) < -60


def peak_bytes(run: Callable[[], object]) -> int:
    """The most memory (numpy's arrays too) allocated at once while ``run`` runs, above what
    was allocated before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_resampling_a_long_buffer_takes_bounded_memory() -> None:
    """Its temporaries were an index array of (outputs x taps) int64 and two like it: 150 MB
    for 2 s of CD audio, 2 GB for 25 minutes of it."""
    pcm = pcm16(sine(1000, 44100, 4.0))
    out_bytes = 2 * 64000
    assert peak_bytes(lambda: resample(pcm, 44100, 16000)) < 2 * out_bytes + (8 << 20)


def test_a_ratio_of_many_phases_builds_no_table() -> None:
    """16000/44099 has 16000 phases of 188 taps: a 24 MB table, 145 MB to build it (and 16000 of
    3268, 418 MB, from 767999 Hz). Their rows are computed as they are needed."""
    pcm = pcm16(sine(1000, 44099, 0.1))
    assert peak_bytes(lambda: Resampler(44099, 16000).process(pcm)) < 12 << 20


@pytest.mark.parametrize(("src", "dst"), [(44099, 16000), (44100, 16000)])
def test_computed_rows_do_not_depend_on_chunking(src: int, dst: int) -> None:
    pcm = pcm16(np.random.default_rng(3).standard_normal(src // 4) * 0.1)
    whole = resample(pcm, src, dst)
    rnd = random.Random(src)
    for _ in range(3):
        r = Resampler(src, dst)
        out, i = [], 0
        while i < len(pcm):
            n = rnd.choice([1, 3, 160, 4099, 70001])
            out.append(r.process(pcm[i : i + n]))
            i += n
            assert r.held <= 2 * r.lookahead + 1  # its history and lookahead, no more
        out.append(r.flush())
        assert b"".join(out) == whole
