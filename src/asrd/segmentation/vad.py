"""Frame-level voice detection: is this 10/20/30 ms frame speech?

The segmenter only needs a yes/no per frame, so detectors are swappable: unit tests inject a
scripted one, production uses :class:`WebrtcVad`.

``speech_noise_threshold`` (Alibaba NLS, ``[-1, 1]``; toward -1 more noise counts as speech,
toward +1 more speech counts as noise; ``None`` means 0) drives two knobs:

========================  ================  ===========================
threshold ``t``           webrtcvad mode    energy gate (frame RMS)
========================  ================  ===========================
``-1 <= t < -0.5``        0 (least strict)  ``-47 + 17 t`` dBFS:
``-0.5 <= t < 0``         1                 ``-1`` -> -64 dBFS
``0 <= t < 0.5`` / None   2                 ``0`` / None -> -47 dBFS
``0.5 <= t <= 1``         3 (most strict)   ``+1`` -> -30 dBFS
========================  ================  ===========================

A frame is voiced only if webrtcvad says so AND its RMS reaches the gate. The gate exists
because webrtcvad in modes 0-2, once adapted to a speaker's room tone, calls -50 dBFS white
noise speech for seconds on end. -47 dBFS rejects that with 3 dB of margin (a 30 ms frame of
Gaussian noise varies by < 0.5 dB) while speech with an active level down to about -41 dBFS
(18 dB quieter than the LibriVox test clips, 15 dB below the nominal -26 dBov of ITU-T
P.56) still opens a sentence on time. Louder hiss (-40 dBFS white noise passes every mode)
is taken for speech: raise the threshold for such lines.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import webrtcvad

FULL_SCALE = 32768.0
VALID_SAMPLE_RATES = (8000, 16000)
VALID_FRAME_MS = (10, 20, 30)


class VoiceDetector(Protocol):
    """Decides whether one frame of 16-bit mono PCM is speech."""

    def is_speech(self, frame: bytes) -> bool: ...


@runtime_checkable
class BatchVoiceDetector(VoiceDetector, Protocol):
    """A detector that can classify many consecutive frames in one call (cheaper per frame)."""

    def classify(self, frames: bytes, frame_bytes: int) -> list[bool]: ...


def webrtc_mode(threshold: float | None) -> int:
    """webrtcvad aggressiveness (0..3) for a ``speech_noise_threshold``; ``None`` -> 2."""
    t = _clamp(threshold)
    if t < -0.5:
        return 0
    if t < 0.0:
        return 1
    if t < 0.5:
        return 2
    return 3


def energy_gate_dbfs(threshold: float | None) -> float:
    """Minimum frame RMS in dBFS for a frame to count as speech: ``-47 + 17 t``."""
    return -47.0 + 17.0 * _clamp(threshold)


def _clamp(threshold: float | None) -> float:
    if threshold is None:
        return 0.0
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"speech_noise_threshold must be in [-1, 1], got {threshold}")
    return float(threshold)


class WebrtcVad:
    """webrtcvad plus an RMS gate, both set from ``speech_noise_threshold``.

    Stateful (webrtcvad adapts to the noise it hears), so use one instance per stream.
    """

    __slots__ = ("_gate", "_process", "_rate", "_vad", "gate_dbfs", "mode")

    def __init__(self, sample_rate: int, threshold: float | None = None) -> None:
        if sample_rate not in VALID_SAMPLE_RATES:
            raise ValueError(f"sample_rate must be one of {VALID_SAMPLE_RATES}")
        self._rate = sample_rate
        self._vad = webrtcvad.Vad()
        self._process = self._vad.is_speech
        self.set_threshold(threshold)

    def set_threshold(self, threshold: float | None) -> None:
        """Change the threshold mid-stream (ControlTranscriber); webrtcvad keeps what it has
        learnt of the noise."""
        self.mode = webrtc_mode(threshold)
        self.gate_dbfs = energy_gate_dbfs(threshold)
        # Compared against the mean square of a frame, so no sqrt/log per frame.
        self._gate = (FULL_SCALE * 10 ** (self.gate_dbfs / 20)) ** 2
        self._vad.set_mode(self.mode)

    def is_speech(self, frame: bytes) -> bool:
        voiced = bool(self._process(frame, self._rate))
        if not voiced:
            return False
        x = np.frombuffer(frame, dtype="<i2").astype(np.float32)
        return float(np.dot(x, x)) >= self._gate * len(x)

    def classify(self, frames: bytes, frame_bytes: int) -> list[bool]:
        """Classify ``len(frames) // frame_bytes`` consecutive frames; one numpy pass for all."""
        n = len(frames) // frame_bytes
        process = self._process
        rate = self._rate
        mv = memoryview(frames)
        # webrtcvad runs on every frame, loud or not, so its noise model keeps adapting.
        voiced = [
            bool(process(mv[i : i + frame_bytes], rate))
            for i in range(0, n * frame_bytes, frame_bytes)
        ]
        if not any(voiced):
            return voiced  # the usual case in pauses: no numpy call at all
        spf = frame_bytes // 2
        x = np.frombuffer(frames, dtype="<i2", count=n * spf).astype(np.float32).reshape(n, spf)
        gate = self._gate * spf
        energy: list[float] = np.einsum("ij,ij->i", x, x).tolist()
        return [v and e >= gate for v, e in zip(voiced, energy, strict=True)]
