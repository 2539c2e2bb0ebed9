"""Sentence segmentation: a pure state machine from PCM to utterances.

No trio and no clock: time is the number of samples fed so far, so the same audio always
gives the same utterances, however it is chunked. One :class:`Segmenter` per stream.

Rules (frame = ``frame_ms`` of audio, classified voiced/unvoiced by a
:class:`~asrd.segmentation.vad.VoiceDetector`):

* **Onset.** While idle, an utterance opens at the end of a frame when at least
  ``ceil(onset_ratio * N)`` of the last ``N = onset_window_ms // frame_ms`` frames are voiced.
  ``begin_ms`` is the start of the first voiced frame in that window; the utterance's audio
  starts ``preroll_ms`` earlier, but never before 0 nor before the end of the previous
  utterance, so every sample belongs to at most one utterance and utterances never overlap.
* **Offset.** While open every frame goes to the utterance. It closes at the end of the frame
  that makes the run of unvoiced frames reach ``max_sentence_silence_ms`` (so with 30 ms
  frames and 800 ms, after 27 frames = 810 ms), or, unless ``ignore_sentence_timeout``, at
  the end of the frame where ``end - begin`` reaches ``max_sentence_ms`` (``timed_out``).
  When :meth:`Segmenter.set_max_sentence_silence` lowers the limit below the pause already
  running, the utterance closes at the start of the next :meth:`Segmenter.feed`, before
  its first frame.
  After any close the onset window starts empty: a new utterance needs fresh evidence, and
  if speech simply continues after a forced close it begins exactly where the last ended.
* **Pauses.** Of a pause within an open utterance, the first ``trailing_silence_ms`` goes out
  with the utterance at once; the rest is held back until a voiced frame comes (then it goes
  out ahead of it, so the utterance's audio stays contiguous) or the pause closes the
  utterance (then it is dropped). The engine ends its last word within that much silence: 300
  ms gives the same words and word times as the whole pause on the bench recordings, and the
  rest of an 800 ms pause is 9% of the utterances' audio and 7.6% of the instructions that
  decode them, which no result needs (docs/benchmarks.md). A worker that is behind then has
  less to decode before a sentence's final result. Once a pause is longer than
  ``pause_hint_ms`` (and ``trailing_silence_ms``), the feed that saw it reports
  :class:`UtterancePaused`, once per pause: the audio sent so far is all the utterance will
  have if that pause closes it, so an engine may start its final pass there.
* Audio outside utterances is dropped, except the ring buffer needed for pre-roll.

Per-frame work is a few integer operations plus the detector call; audio is sliced once
per utterance segment per :meth:`Segmenter.feed`, so each call yields at most one
:class:`UtteranceAudio` per utterance.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .vad import (
    VALID_FRAME_MS,
    VALID_SAMPLE_RATES,
    BatchVoiceDetector,
    VoiceDetector,
    WebrtcVad,
)

MIN_SENTENCE_SILENCE_MS = 200
MAX_SENTENCE_SILENCE_MS = 6000


@dataclass(frozen=True, slots=True)
class SegmenterConfig:
    """Segmentation settings of one stream; all durations in milliseconds."""

    sample_rate: int  # 8000 or 16000
    max_sentence_silence_ms: int = 800  # silence that closes a sentence (200..6000)
    # [-1, 1]: -1 more noise counts as speech, +1 more speech counts as noise; None = 0.
    speech_noise_threshold: float | None = None
    max_sentence_ms: int = 60_000  # force-close longer sentences ...
    ignore_sentence_timeout: bool = False  # ... unless this is set
    frame_ms: int = 30  # webrtcvad frame (10/20/30)
    preroll_ms: int = 300  # audio before the detected onset sent with the utterance
    onset_window_ms: int = 300  # window of recent frames looked at for an onset
    onset_ratio: float = 0.6  # fraction of that window that must be voiced
    trailing_silence_ms: int = 300  # of a pause, what goes out before speech resumes
    # A pause this long (at least trailing_silence_ms) is reported (UtterancePaused).
    pause_hint_ms: int = 500

    def __post_init__(self) -> None:
        if self.sample_rate not in VALID_SAMPLE_RATES:
            raise ValueError(f"sample_rate must be one of {VALID_SAMPLE_RATES}")
        if self.frame_ms not in VALID_FRAME_MS:
            raise ValueError(f"frame_ms must be one of {VALID_FRAME_MS}")
        _check_silence(self.max_sentence_silence_ms)
        if self.speech_noise_threshold is not None and not (
            -1.0 <= self.speech_noise_threshold <= 1.0
        ):
            raise ValueError("speech_noise_threshold must be in [-1, 1]")
        if self.max_sentence_ms < self.frame_ms:
            raise ValueError("max_sentence_ms must be at least one frame")
        if self.preroll_ms < 0:
            raise ValueError("preroll_ms must be >= 0")
        if self.onset_window_ms < self.frame_ms:
            raise ValueError("onset_window_ms must be at least one frame")
        if not 0.0 < self.onset_ratio <= 1.0:
            raise ValueError("onset_ratio must be in (0, 1]")
        if self.trailing_silence_ms < 0:
            raise ValueError("trailing_silence_ms must be >= 0")
        if self.pause_hint_ms < 0:
            raise ValueError("pause_hint_ms must be >= 0")


def _check_silence(ms: int) -> None:
    if not MIN_SENTENCE_SILENCE_MS <= ms <= MAX_SENTENCE_SILENCE_MS:
        raise ValueError(
            f"max_sentence_silence must be {MIN_SENTENCE_SILENCE_MS}..{MAX_SENTENCE_SILENCE_MS}"
            f" ms, got {ms}"
        )


@dataclass(frozen=True, slots=True)
class UtteranceStarted:
    begin_ms: int  # stream time of the speech onset (-> SentenceBegin.time)
    # Stream time of the first sample sent for this utterance (onset minus pre-roll, >= 0);
    # engine word times are relative to this.
    audio_start_ms: int


@dataclass(frozen=True, slots=True)
class UtteranceAudio:
    pcm: bytes  # audio of the open utterance, contiguous and in order


@dataclass(frozen=True, slots=True)
class UtterancePaused:
    """The open utterance's pause passed ``pause_hint_ms`` (and ``trailing_silence_ms``): what
    was sent is all of the utterance, unless speech resumes before the pause closes it."""

    speech_end_ms: int  # stream time of the end of the last voiced frame


@dataclass(frozen=True, slots=True)
class UtteranceEnded:
    end_ms: int  # stream time at which the utterance was closed (audio processed)
    speech_end_ms: int  # stream time of the end of the last voiced frame
    timed_out: bool  # closed because of max_sentence_ms


SegmentEvent = UtteranceStarted | UtteranceAudio | UtterancePaused | UtteranceEnded


class _PerFrame:
    """Adapts a plain :class:`VoiceDetector` to the batch call the segmenter makes."""

    __slots__ = ("_is_speech",)

    def __init__(self, vad: VoiceDetector) -> None:
        self._is_speech = vad.is_speech

    def classify(self, frames: bytes, frame_bytes: int) -> list[bool]:
        f = self._is_speech
        return [
            bool(f(frames[i : i + frame_bytes]))
            for i in range(0, len(frames) - frame_bytes + 1, frame_bytes)
        ]


class Segmenter:
    """Turns a PCM stream into :data:`SegmentEvent` s; see the module docstring for rules."""

    def __init__(self, config: SegmenterConfig, vad: VoiceDetector | None = None) -> None:
        self.config = config
        rate = config.sample_rate
        if vad is None:
            vad = WebrtcVad(rate, config.speech_noise_threshold)
        self._vad = vad
        self._classify = (vad if isinstance(vad, BatchVoiceDetector) else _PerFrame(vad)).classify

        self._rate = rate
        self._fs = config.frame_ms * rate // 1000  # samples per frame
        self._fb = 2 * self._fs  # bytes per frame
        window_frames = max(1, config.onset_window_ms // config.frame_ms)
        self._window = window_frames * self._fs  # onset window, samples
        self._trigger = max(1, math.ceil(config.onset_ratio * window_frames - 1e-9))
        self._preroll = config.preroll_ms * rate // 1000
        self._max_silence = config.max_sentence_silence_ms * rate // 1000
        self._max_len = (
            None if config.ignore_sentence_timeout else config.max_sentence_ms * rate // 1000
        )
        # Bytes of idle audio the pre-roll can reach back into from the start of a feed.
        self._hist_cap = 2 * (self._window + self._preroll)

        self._pending = bytearray()  # bytes not yet a whole frame
        self._pos = 0  # samples processed (whole frames), i.e. stream time
        self._floor = 0  # no utterance audio may start before this (end of the last one)
        # idle state
        self._hist = bytearray()  # idle audio right before ``_pos`` (pre-roll ring buffer)
        self._voiced: deque[int] = deque()  # start samples of voiced frames in the window
        # open state
        self._open = False
        self._begin = 0
        self._speech_end = 0
        self._silence = 0  # samples of unvoiced frames since the last voiced one
        self._tail = config.trailing_silence_ms * rate // 1000
        self._held = bytearray()  # the pause beyond ``_tail`` so far, not sent yet
        # A pause longer than this is reported, once (``_hinted``).
        self._hint = max(config.pause_hint_ms * rate // 1000, self._tail)
        self._hinted = False

    @property
    def processed_ms(self) -> int:
        """Stream time of the end of the last whole frame processed."""
        return self._pos * 1000 // self._rate

    @property
    def is_open(self) -> bool:
        return self._open

    def set_max_sentence_silence(self, ms: int) -> None:
        """Change the closing silence mid-stream; applies from the next frame processed. A
        pause already as long closes the open utterance at the next :meth:`feed`, before its
        first frame (a frame of speech resuming does not undo it)."""
        _check_silence(ms)
        self._max_silence = ms * self._rate // 1000

    def set_speech_noise_threshold(self, threshold: float) -> None:
        """Change the detector's threshold mid-stream; applies from the next frame processed.
        A detector passed in by the caller keeps its own setting."""
        if isinstance(self._vad, WebrtcVad):
            self._vad.set_threshold(threshold)

    def feed(self, pcm: bytes) -> list[SegmentEvent]:
        """Process audio of any length; a trailing partial frame waits for the next call."""
        events: list[SegmentEvent] = []
        if self._open and self._silence >= self._max_silence:
            # A lower max_sentence_silence came during a longer pause: the pause has ended
            # the sentence, where the audio processed so far ends, whatever comes next.
            self._open = False
            self._floor = self._pos
            self._hist.clear()
            self._held.clear()
            events.append(UtteranceEnded(self._ms(self._pos), self._ms(self._speech_end), False))
        buf = self._pending
        buf += pcm
        fb = self._fb
        usable = len(buf) // fb * fb
        if not usable:
            return events
        data = bytes(buf[:usable])
        del buf[:usable]
        flags = self._classify(data, fb)

        fs = self._fs
        ms = self._ms
        pos = self._pos  # start of the current frame
        feed_start = pos
        # Where the audio of the current state starts in ``data`` (bytes), and any pre-roll
        # taken from the ring buffer that must be sent ahead of it.
        seg_from = 0
        prefix = b""
        voiced_q = self._voiced
        trigger = self._trigger
        window = self._window
        is_open = self._open
        silence = self._silence
        max_len = self._max_len
        max_silence = self._max_silence
        begin = self._begin
        speech_end = self._speech_end
        hinted = self._hinted

        for v in flags:
            end = pos + fs
            if is_open:
                if v:
                    silence = 0
                    hinted = False
                    speech_end = end
                else:
                    silence += fs
                timed_out = False
                if silence >= max_silence or (
                    timed_out := max_len is not None and end - begin >= max_len
                ):
                    off = (end - feed_start) * 2
                    if pcm := self._release(prefix + data[seg_from:off], silence):
                        events.append(UtteranceAudio(pcm))
                    self._held.clear()  # the rest of the pause: no result needs it
                    events.append(UtteranceEnded(ms(end), ms(speech_end), timed_out))
                    is_open = False
                    prefix = b""
                    seg_from = off
                    self._floor = end
                    self._hist.clear()
                    voiced_q.clear()
            elif v:
                voiced_q.append(pos)
                lo = end - window
                while voiced_q[0] < lo:
                    voiced_q.popleft()
                if len(voiced_q) >= trigger:
                    begin = voiced_q[0]
                    start = max(begin - self._preroll, self._floor)
                    if start < feed_start:
                        # pre-roll reaches into audio from earlier feeds (only if idle then)
                        prefix = bytes(self._hist[len(self._hist) - (feed_start - start) * 2 :])
                        seg_from = 0
                    else:
                        seg_from = (start - feed_start) * 2
                    events.append(UtteranceStarted(ms(begin), ms(start)))
                    is_open = True
                    voiced_q.clear()
                    speech_end = end
                    silence = 0
                    hinted = False
            pos = end

        if is_open:
            if pcm := self._release(prefix + data[seg_from:], silence):
                events.append(UtteranceAudio(pcm))
            if silence > self._hint and not hinted:
                events.append(UtterancePaused(ms(speech_end)))
                hinted = True
        else:
            hist = self._hist
            if seg_from == 0:
                hist += data
            else:
                hist[:] = data[seg_from:]
            if len(hist) > self._hist_cap:
                del hist[: len(hist) - self._hist_cap]
        self._pos = pos
        self._open = is_open
        self._silence = silence
        self._begin = begin
        self._speech_end = speech_end
        self._hinted = hinted
        return events

    def flush(self) -> list[SegmentEvent]:
        """End of stream: the partial frame joins an open utterance, which is then closed."""
        tail = len(self._pending) // 2 * 2
        extra = bytes(self._pending[:tail])
        self._pending.clear()
        self._pos += tail // 2
        self._hist.clear()
        self._voiced.clear()
        self._floor = self._pos
        if not self._open:
            return []
        self._open = False
        events: list[SegmentEvent] = []
        # The partial frame, unclassified, counts as more of the pause.
        if extra and (pcm := self._release(extra, self._silence + len(extra) // 2)):
            events.append(UtteranceAudio(pcm))
        self._held.clear()
        events.append(UtteranceEnded(self._ms(self._pos), self._ms(self._speech_end), False))
        return events

    def _release(self, pcm: bytes, silence: int) -> bytes:
        """The open utterance's audio to send now: what was held back, then ``pcm``, less the
        part of the running pause (``silence`` samples) beyond ``trailing_silence_ms``, which
        is held back in turn."""
        held = self._held
        keep = max(0, (silence - self._tail) * 2)  # bytes at the end to hold back
        if keep >= len(held) + len(pcm):  # the pause goes on: no copy of what is held
            held += pcm
            return b""
        if not held:  # the common case: speech, or the first of a pause
            if keep:
                held += pcm[len(pcm) - keep :]
                return pcm[: len(pcm) - keep]
            return pcm
        held += pcm  # speech resumed: what was held goes out first
        out = bytes(held[: len(held) - keep])
        del held[: len(held) - keep]
        return out

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self._rate
