"""Helpers that build test recordings from real clips, silence and noise.

Everything is 16-bit little-endian mono PCM as ``bytes``, the format the gateway receives, so
recordings can be fed to a segmenter, a codec or a websocket client without conversion. Noise
is seeded so every run of a test sees the same samples.
"""

from __future__ import annotations

import wave
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
#: The LibriVox clips (16 kHz mono 16-bit) by short name, e.g. ``"0880"``.
LIBRIVOX: dict[str, Path] = {
    p.stem.rsplit("-", 1)[-1]: p for p in sorted(DATA_DIR.glob("sense_and_sensibility_*.wav"))
}
FULL_SCALE = 32768.0


def read_wav(path: str | Path) -> tuple[bytes, int]:
    """Return ``(pcm, sample_rate)`` of a mono 16-bit WAV file."""
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: need mono 16-bit PCM")
        return w.readframes(w.getnframes()), w.getframerate()


def write_wav(path: str | Path, pcm: bytes, rate: int) -> None:
    """Write mono 16-bit PCM as a WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)


@cache
def transcripts() -> dict[str, str]:
    """Reference transcripts of the LibriVox clips, keyed by short name (``"0880"``)."""
    out: dict[str, str] = {}
    for line in (DATA_DIR / "librivox.transcription").read_text().splitlines():
        if not line.strip():
            continue
        text, _, ident = line.rpartition("(")
        words = [w for w in text.split() if w not in ("<s>", "</s>")]
        out[ident.rstrip(") ").rsplit("-", 1)[-1]] = " ".join(words)
    return out


def to_array(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2")


def from_array(samples: np.ndarray) -> bytes:
    """Round and clip float or int samples to 16-bit PCM bytes."""
    return bytes(np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes())


def resample(pcm: bytes, from_rate: int, to_rate: int) -> bytes:
    """Band-limited resampling by FFT (fine for tests; keeps duration exact in samples)."""
    if from_rate == to_rate:
        return pcm
    x = to_array(pcm).astype(np.float64)
    n = len(x)
    m = n * to_rate // from_rate
    spectrum = np.fft.rfft(x)
    keep = min(len(spectrum), m // 2 + 1)
    out = np.zeros(m // 2 + 1, dtype=complex)
    out[:keep] = spectrum[:keep]
    return from_array(np.fft.irfft(out, m) * (m / n))


def sine(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    """A sine as floats, 1.0 being full scale: for tests of converters and filters."""
    t = np.arange(int(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def pcm16(x: np.ndarray) -> bytes:
    """Floats (1.0: full scale) as 16-bit PCM bytes."""
    return from_array(x * 32768)


def samples(ms: int, rate: int) -> int:
    return ms * rate // 1000


def silence(ms: int, rate: int) -> bytes:
    """Digital silence (all-zero samples)."""
    return bytes(2 * samples(ms, rate))


def noise(ms: int, rate: int, dbfs: float = -50.0, seed: int = 0) -> bytes:
    """Seeded white Gaussian noise whose RMS is ``dbfs`` relative to full scale."""
    sigma = FULL_SCALE * 10 ** (dbfs / 20)
    rng = np.random.default_rng(seed)
    return from_array(rng.normal(0.0, sigma, samples(ms, rate)))


def tone(ms: int, rate: int, hz: float = 440.0, dbfs: float = -20.0) -> bytes:
    """A sine tone, handy as loud non-speech."""
    t = np.arange(samples(ms, rate)) / rate
    amp = FULL_SCALE * 10 ** (dbfs / 20) * np.sqrt(2)
    return from_array(amp * np.sin(2 * np.pi * hz * t))


def frame_dbfs(pcm: bytes, rate: int, frame_ms: int = 10) -> np.ndarray:
    """RMS level of consecutive frames in dBFS (-120 for digital silence)."""
    n = samples(frame_ms, rate)
    x = to_array(pcm).astype(np.float64)
    frames = x[: len(x) // n * n].reshape(-1, n)
    rms = np.sqrt((frames**2).mean(axis=1))
    return np.asarray(20 * np.log10(np.maximum(rms, 1e-6 * FULL_SCALE) / FULL_SCALE))


def speech_bounds(
    pcm: bytes, rate: int, threshold_dbfs: float = -35.0, frame_ms: int = 10
) -> tuple[int, int]:
    """``(start_ms, end_ms)`` of the loud part of a clip, by a simple energy scan.

    The LibriVox clips carry about 250 ms of -45 dBFS room tone before the first word and
    about 100 ms after the last; this finds where speech really is, to compare a VAD against.
    """
    loud = np.flatnonzero(frame_dbfs(pcm, rate, frame_ms) >= threshold_dbfs)
    if len(loud) == 0:
        raise ValueError("no speech found")
    return int(loud[0]) * frame_ms, (int(loud[-1]) + 1) * frame_ms


def load_clip(name: str, rate: int = 16000) -> bytes:
    """A LibriVox clip by short name, resampled to ``rate``."""
    pcm, src_rate = read_wav(LIBRIVOX[name])
    return resample(pcm, src_rate, rate)


@dataclass(frozen=True, slots=True)
class Clip:
    """A part of a recording whose position :func:`assemble` should report."""

    pcm: bytes
    name: str = ""


def assemble(parts: Iterable[bytes | Clip], rate: int) -> tuple[bytes, list[tuple[int, int]]]:
    """Concatenate parts; return the PCM and ``(start_ms, end_ms)`` of each :class:`Clip`.

    Plain ``bytes`` parts are fillers (silence, noise) whose position is not reported.
    """
    out = bytearray()
    spans: list[tuple[int, int]] = []
    for part in parts:
        pcm = part.pcm if isinstance(part, Clip) else part
        if len(pcm) % 2:
            raise ValueError("odd byte count in a 16-bit part")
        start = len(out) // 2 * 1000 // rate
        out += pcm
        if isinstance(part, Clip):
            spans.append((start, len(out) // 2 * 1000 // rate))
    return bytes(out), spans
