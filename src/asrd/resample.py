"""Sample-rate conversion of PCM16LE mono audio (numpy, windowed-sinc polyphase).

Engines run at their model's rate (pocketsphinx's bundled model: 16 kHz) while clients may
send 8 kHz telephone audio; ``asrd transcribe`` converts its input (any rate up to 768 kHz)
to 16 kHz. :class:`Resampler` converts a stream chunk by chunk and gives
exactly the samples :func:`resample` gives for the whole buffer, however the stream is cut
(odd byte counts included), so results never depend on how the network chunked the audio.

The kernel is centred (zero delay): output sample ``m`` sits at input time ``m * from / to``.
That keeps word times identical at both rates, at the price of holding back a few
milliseconds of input (``lookahead`` samples) until more audio or :meth:`Resampler.flush`
arrives.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt

__all__ = ["Resampler", "output_length", "resample"]

# Kernel: a Kaiser-windowed sinc, 32 zero crossings each side, beta 6 (~60 dB stop band), cut
# off at 94% of the lower Nyquist frequency. For 8 -> 16 kHz that is flat (< 0.01 dB) to
# 3.5 kHz, -2.5 dB at 3.7 kHz, and the images of the speech band above 4 kHz stay below
# -42 dB (-70 dB from 4.3 kHz on): nothing for a 16 kHz model to mistake for speech. Cost:
# ~70 multiply-adds per output sample, ~0.35 ms of CPU per 100 ms of 8 kHz audio.
_ZERO_CROSSINGS = 32
_KAISER_BETA = 6.0
_ROLLOFF = 0.94
# Memory stays bounded whatever the input's length and rates: process() takes the input in
# blocks of _BLOCK_IN samples, _emit() computes outputs in blocks of _BLOCK_TAPS kernel taps in
# all (1 MB per float64 temporary), and the polyphase table is kept only up to _TABLE_TAPS
# taps: the ratio 16000/44099 has 16000 phases of 188 taps (a 24 MB table), 16000/767999 16000
# of 3268 (418 MB); the rows of such a ratio are computed for each block instead.
_BLOCK_IN = 1 << 16
_BLOCK_TAPS = 1 << 17
_TABLE_TAPS = 1 << 20

_Floats = npt.NDArray[np.float64]


class _Kernel:
    """Polyphase windowed-sinc low-pass for the ratio ``up / down`` (reduced)."""

    __slots__ = ("cutoff", "down", "half", "offsets", "table", "up", "window")

    def __init__(self, up: int, down: int) -> None:
        self.up = up
        self.down = down
        # Cut-off in units of the input rate's Nyquist: below both Nyquist frequencies.
        self.cutoff = _ROLLOFF * min(1.0, up / down)
        self.half = math.ceil(_ZERO_CROSSINGS / self.cutoff)
        # Output m uses inputs n + offsets where n = floor(m * down / up).
        self.offsets = np.arange(-self.half + 1, self.half + 1, dtype=np.int64)
        self.window = np.kaiser(2 * self.half + 1, _KAISER_BETA)
        self.table: _Floats | None = None
        if up * len(self.offsets) <= _TABLE_TAPS:
            self.table = self._rows(np.arange(up, dtype=np.int64))

    def weights(self, phases: npt.NDArray[np.int64]) -> _Floats:
        """The taps of each output's phase (``m * down % up``), one row per output."""
        return self._rows(phases) if self.table is None else self.table[phases]

    def _rows(self, phases: npt.NDArray[np.int64]) -> _Floats:
        u = phases[:, None] / self.up - self.offsets[None, :]  # input-sample distance
        # Interpolate the window at the fractional positions (it is smooth, linear is fine).
        grid = np.arange(-self.half, self.half + 1, dtype=np.float64)
        w = np.interp(u, grid, self.window)
        rows = self.cutoff * np.sinc(self.cutoff * u) * w
        # Unit DC gain for every phase: a constant input stays exactly constant.
        result: _Floats = rows / rows.sum(axis=1, keepdims=True)
        return result


@lru_cache(maxsize=16)
def _kernel(from_rate: int, to_rate: int) -> _Kernel:
    g = math.gcd(from_rate, to_rate)
    return _Kernel(to_rate // g, from_rate // g)


def _check_rates(from_rate: int, to_rate: int) -> None:
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")


def _to_pcm16(y: _Floats) -> bytes:
    return np.clip(np.rint(y), -32768, 32767).astype("<i2").tobytes()


def output_length(n_in: int, from_rate: int, to_rate: int) -> int:
    """Samples produced for ``n_in`` input samples: ``ceil(n_in * to / from)``."""
    return -((-n_in * to_rate) // from_rate)


def resample(pcm: bytes, from_rate: int, to_rate: int) -> bytes:
    """Convert a whole PCM16LE mono buffer (a trailing odd byte is ignored)."""
    _check_rates(from_rate, to_rate)
    if from_rate == to_rate:
        return pcm[: len(pcm) - len(pcm) % 2]
    r = Resampler(from_rate, to_rate)
    return r.process(pcm) + r.flush()


class Resampler:
    """Streaming converter; ``process(a) + process(b) + flush() == resample(a + b)``.

    Keeps the input history the kernel needs, the byte of an odd-length chunk and the index
    of the next output sample, so chunk boundaries never change the output.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        _check_rates(from_rate, to_rate)
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._passthrough = from_rate == to_rate
        self._k = _kernel(from_rate, to_rate)
        self._carry = b""  # odd trailing byte of the last chunk
        # Input samples from absolute index self._base on, with zeros before the stream.
        self._buf: _Floats = np.zeros(self._k.half - 1, dtype=np.float64)
        self._base = -(self._k.half - 1)
        self._n_in = 0  # input samples received
        self._m = 0  # next output sample
        self._flushed = False

    @property
    def lookahead(self) -> int:
        """Input samples held back until more audio (or flush) arrives."""
        return 0 if self._passthrough else self._k.half

    def process(self, pcm: bytes) -> bytes:
        """Convert a chunk of any length; returns every output sample that is complete."""
        if self._flushed:
            raise RuntimeError("Resampler used after flush()")
        if self._carry:
            pcm = self._carry + pcm
        usable = len(pcm) - len(pcm) % 2
        self._carry = pcm[usable:]
        if self._passthrough:
            return pcm[:usable]
        k = self._k
        out = []
        for offset in range(0, usable, 2 * _BLOCK_IN):
            count = min(_BLOCK_IN, (usable - offset) // 2)
            x = np.frombuffer(pcm, dtype="<i2", count=count, offset=offset).astype(np.float64)
            self._buf = np.concatenate((self._buf, x))
            self._n_in += len(x)
            # Output m is complete once its last input, floor(m*down/up) + half, has arrived.
            ready = self._n_in - k.half
            out.append(self._emit(output_length(ready, k.down, k.up) if ready > 0 else 0))
        return b"".join(out)

    def flush(self) -> bytes:
        """End of stream: the held-back outputs, computed with silence after the end."""
        if self._flushed:
            return b""
        self._flushed = True
        self._carry = b""
        if self._passthrough:
            return b""
        k = self._k
        self._buf = np.concatenate((self._buf, np.zeros(k.half, dtype=np.float64)))
        return self._emit(output_length(self._n_in, k.down, k.up))

    @property
    def held(self) -> int:
        """Input samples kept between calls: the kernel's history and lookahead, bounded
        whatever the length of the stream."""
        return len(self._buf)

    def _emit(self, end: int) -> bytes:
        """Outputs up to ``end``, computed in blocks that bound the temporaries' size."""
        k = self._k
        if end <= self._m:
            return b""
        step = max(1, _BLOCK_TAPS // len(k.offsets))
        out = []
        for start in range(self._m, end, step):
            t = np.arange(start, min(start + step, end), dtype=np.int64) * k.down
            idx = (t // k.up)[:, None] + k.offsets[None, :] - self._base
            out.append(_to_pcm16(np.einsum("ij,ij->i", self._buf[idx], k.weights(t % k.up))))
        self._m = end
        # Drop the history that no later output can reach.
        next_n = (end * k.down) // k.up
        drop = next_n - k.half + 1 - self._base
        if drop > 0:
            self._buf = self._buf[drop:]
            self._base += drop
        return b"".join(out)
