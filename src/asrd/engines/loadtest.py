"""The load-test engine: placeholder text at a realistic cadence, at near-zero CPU.

**Not a speech recogniser.** It exists so that the gateway + NATS + worker path can be measured
(``asrd bench``) without the cost of recognition. It is never the default engine; a worker
runs it only when asked by name (``asrd worker --engine loadtest``, or ``[worker] engine =
"loadtest"``).

What it "recognises" is deterministic and depends only on the amount and loudness of the
audio, never on chunking:

* The utterance's audio is cut into blocks of :data:`BLOCK_MS` (in whole samples: 220, or
  19.95 ms, at 11025 Hz) counted from its first sample (whatever the chunk sizes); a block
  is *sound* when its peak (over every :data:`PEAK_STRIDE` th sample) reaches
  :data:`SOUND_PEAK`. The utterance's sound spans
  from the start of its first sound block to the end of its last one. Digital silence and
  quiet room tone are not sound.
* The text has one word per started :data:`WORD_MS` of that span: ``loadtest word1 word2 ...``;
  word ``k`` spans ``[first + k * WORD_MS, min(first + (k + 1) * WORD_MS, last))``. So a
  partial changes about every 300 ms of speech, like a real engine's, and the last word ends
  where the sound ends, which is what endpointing latency is measured from.
* Final results have the fixed confidence :data:`CONFIDENCE`; partials have 0.0 (like
  pocketsphinx, whose partials carry no posterior).

Per 100 ms of audio the work is five strided peaks over 1/16 of the samples, in C; no
numpy. A recognizer's ``final_cost`` is 0: ``finish()`` never blocks.
"""

from __future__ import annotations

from typing import Any

from asrd.engines.base import EMPTY_HYPOTHESIS, EngineFull, EngineWord, Hypothesis, Recognizer
from asrd.errors import UnsupportedSampleRate

__all__ = [
    "BLOCK_MS",
    "CONFIDENCE",
    "PEAK_STRIDE",
    "SOUND_PEAK",
    "WORD_MS",
    "LoadtestEngine",
    "LoadtestRecognizer",
]

WORD_MS = 300  # one placeholder word per this much sound
BLOCK_MS = 20  # resolution of the sound detection
CONFIDENCE = 0.5  # confidence of every final result
SOUND_PEAK = 500  # |sample| (of 32768) that makes a block sound: about -36 dBFS
PEAK_STRIDE = 16  # look at every 16th sample only
FIRST_WORD = "loadtest"
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000


def placeholder_words(first_ms: int, last_ms: int) -> tuple[EngineWord, ...]:
    """The words of a sound span ``[first_ms, last_ms)``; empty when the span is empty."""
    if last_ms <= first_ms:
        return ()
    words: list[EngineWord] = []
    start = first_ms
    k = 0
    while start < last_ms:
        end = min(start + WORD_MS, last_ms)
        words.append(EngineWord(FIRST_WORD if k == 0 else f"word{k}", start, end))
        k += 1
        start += WORD_MS
    return tuple(words)


class LoadtestRecognizer:
    """One placeholder recogniser; see :class:`asrd.engines.Recognizer` and the module doc."""

    __slots__ = (
        "_block_bytes",
        "_blocks",
        "_engine",
        "_first_ms",
        "_in_utterance",
        "_last_ms",
        "_partials",
        "_pending",
        "sample_rate",
    )
    final_cost = 0.0
    early_final = False
    state = ""  # each utterance's text depends on that utterance alone

    def __init__(self, engine: LoadtestEngine, sample_rate: int, *, partials: bool) -> None:
        self._engine: LoadtestEngine | None = engine
        self.sample_rate = sample_rate
        self._block_bytes = 2 * (sample_rate * BLOCK_MS // 1000)
        self._partials = partials
        self._in_utterance = False
        self._pending = bytearray()  # audio not yet a whole block
        self._blocks = 0  # whole blocks examined in this utterance
        self._first_ms = -1  # start of the first sound block, -1: none yet
        self._last_ms = 0  # end of the last sound block

    def start(self) -> None:
        self._check()
        if self._in_utterance:
            raise RuntimeError("start() while an utterance is in progress")
        self._in_utterance = True
        self._pending.clear()
        self._blocks = 0
        self._first_ms = -1
        self._last_ms = 0

    def accept(self, pcm: bytes) -> None:
        self._check()
        if not self._in_utterance:
            raise RuntimeError("accept() outside an utterance; call start() first")
        pending = self._pending
        pending += pcm
        size = self._block_bytes
        n = len(pending) // size
        if n:
            data = bytes(pending[: n * size])
            del pending[: n * size]
            self._examine(data, n)

    def partial(self) -> Hypothesis | None:
        self._check()
        if not (self._in_utterance and self._partials) or self._first_ms < 0:
            return None
        return _hypothesis(placeholder_words(self._first_ms, self._last_ms), 0.0)

    def pause(self) -> None:
        self._check()  # finish() is cheap: nothing to do early

    def finish(self) -> Hypothesis:
        self._check()
        if not self._in_utterance:
            raise RuntimeError("finish() outside an utterance; call start() first")
        self._in_utterance = False
        tail = len(self._pending) & ~1
        if tail:  # the last, short block
            self._examine(bytes(self._pending[:tail]), 1, tail)
        self._pending.clear()
        if self._first_ms < 0:
            return EMPTY_HYPOTHESIS
        return _hypothesis(placeholder_words(self._first_ms, self._last_ms), CONFIDENCE)

    def _examine(self, data: bytes, blocks: int, last_block_bytes: int = 0) -> None:
        """Look for sound in ``blocks`` consecutive blocks (the last possibly shorter)."""
        samples = memoryview(data).cast("h")
        per_block = self._block_bytes // 2
        rate = self.sample_rate
        for k in range(blocks):
            block = samples[k * per_block : (k + 1) * per_block : PEAK_STRIDE]
            if max(block) >= SOUND_PEAK or min(block) <= -SOUND_PEAK:
                # Times from sample positions: a block is BLOCK_MS only when the rate is a
                # multiple of 50 Hz (at 11025 Hz it is 220 samples, 19.95 ms), and counting
                # BLOCK_MS per block would put the last word's end after the audio's.
                first = (self._blocks + k) * per_block
                if self._first_ms < 0:
                    self._first_ms = first * 1000 // rate
                length = last_block_bytes // 2 if last_block_bytes else per_block
                self._last_ms = (first + length) * 1000 // rate
        if not last_block_bytes:
            self._blocks += blocks

    def _check(self) -> None:
        if self._engine is None:
            raise RuntimeError("recognizer used after release()")

    def _lent_by(self, engine: LoadtestEngine) -> bool:
        return self._engine is engine

    def _close(self) -> None:
        self._engine = None
        self._in_utterance = False
        self._pending.clear()


def _hypothesis(words: tuple[EngineWord, ...], confidence: float) -> Hypothesis:
    if not words:
        return EMPTY_HYPOTHESIS
    return Hypothesis(" ".join(w.text for w in words), words, confidence)


class LoadtestEngine:
    """``decoders`` placeholder recognisers; see :class:`asrd.engines.Engine`.

    Any other keyword argument the worker passes (``final_pass``, pocketsphinx decoder
    options) is accepted and ignored, so the engine drops into any worker configuration.
    """

    name = "loadtest"
    early_final = False

    def __init__(self, decoders: int, **_ignored: Any) -> None:
        if decoders < 1:
            raise ValueError(f"decoders must be at least 1, got {decoders}")
        self.capacity = decoders
        self._lent = 0

    @property
    def available(self) -> int:
        return self.capacity - self._lent

    def acquire(
        self, sample_rate: int, *, partials: bool = True, state: str = ""
    ) -> LoadtestRecognizer:
        if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise UnsupportedSampleRate(
                f"sample rate {sample_rate} Hz not supported "
                f"({MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz)"
            )
        if self._lent >= self.capacity:
            raise EngineFull(f"all {self.capacity} loadtest recognizers are busy")
        self._lent += 1
        return LoadtestRecognizer(self, sample_rate, partials=partials)

    def release(self, recognizer: Recognizer) -> None:
        if not isinstance(recognizer, LoadtestRecognizer) or not recognizer._lent_by(self):
            raise ValueError("release() of a recognizer not lent by this engine (or twice)")
        recognizer._close()
        self._lent -= 1
