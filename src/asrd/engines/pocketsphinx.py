"""The pocketsphinx engine: CMU PocketSphinx 5 with its bundled US-English model.

Decoders are preloaded at construction (each takes ~0.3 s and ~91 MB) and lent to one session
at a time. A decoder holds the GIL while it decodes, so a worker process gets its
parallelism from more processes, not threads.

Accuracy notes (corpus WER on the five LibriVox clips in ``tests/data``, 71 words):

* Streaming decodes with *live* cepstral mean normalisation (CMN): the mean is estimated
  from the audio heard so far, starting from a prior. Decoding a whole file with
  ``full_utt=True`` uses the mean of the entire utterance (batch CMN), which a stream cannot
  know: 26.8% batch against 35.2% streamed, each clip in a fresh session. Chunking itself
  costs nothing: the streamed results equal a one-call live decode, word for word.
* The CMN estimate (and pocketsphinx's noise estimate) is reset when a session acquires a
  decoder, so one speaker's channel never leaks into the next session and results are
  reproducible. The CMN is carried from one utterance to the next within a session, where it
  improves: each utterance of the live search starts from the CMN the last one ended with
  and a fresh noise estimate. So an utterance's result depends on that CMN and its own audio
  alone, and the CMN is all a worker taking the session over needs (``state``). Operators
  whose channel differs a lot from the prior can pass ``cmninit``.
* 8 kHz audio is up-sampled, so the 4-8 kHz band the wideband model expects is empty and the
  cepstral mean is far from the model's prior: with that prior 8 kHz sessions score 60.6%.
  For the bundled model the prior of 8 kHz sessions is shifted by
  :data:`NARROWBAND_CMN_SHIFT`: 43.7% (35.2% as one session).
* The gap is the first utterance's: decoded live with the CMN of a batch pass over the
  utterance itself, the live search scores the batch WER exactly (both sets below), and the
  CMN of the utterance's first 2 s nearly so (28.2% on the LibriVox clips, 4.8% on cards).
  The batch CMN needs no search: a full-utterance pass through a one-word grammar measures
  the same CMN for ~3 ms per audio-second, against ~100 for the batch pass. So
  ``final_pass = "adaptive"`` measures a session's CMN on its first :data:`ADAPT_AFTER_S` of
  speech, gives it to the live decoder and decodes the utterance so far again with it, once;
  every later final, that utterance's included, is the live search's. A session's
  utterances that end before then get the batch pass, whose CMN counts. Each clip first in
  a session, the others after it: 28.2% on the first, 27.1% on the rest (batch: 26.8%,
  live: 35.2% and 26.1%); on Debian pocketsphinx-testdata's ``cards/*.wav`` (one speaker
  and channel far from the prior, 21 words) 4.8% and 4.8% (batch: 4.8%, live: 47.6% and
  23.8%).
* ``confidence`` of a final result is the mean lattice posterior of its words (see
  ``PocketsphinxRecognizer._words``); on these clips correctly recognised words average
  0.74 and wrong ones 0.49.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pocketsphinx

from asrd.engines.base import (
    EMPTY_HYPOTHESIS,
    EngineFull,
    EngineWord,
    Hypothesis,
    Recognizer,
)
from asrd.errors import EngineFailed, UnsupportedSampleRate
from asrd.resample import Resampler

__all__ = [
    "ADAPT_AFTER_S",
    "DECODER_DEFAULTS",
    "FINAL_PASSES",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "NARROWBAND_CMN_SHIFT",
    "PocketsphinxEngine",
    "PocketsphinxRecognizer",
]

log = logging.getLogger(__name__)

# Mean cepstral shift caused by band-limiting 16 kHz speech to 8 kHz and up-sampling it back
# with asrd.resample, for the bundled model's front end (13 MFCCs, 25 filters 130-6800 Hz).
# Measured with batch CMN on the eight non-LibriVox recordings of Debian's
# pocketsphinx-testdata (goforward.raw, numbers.raw, something.raw, cards/00[1-5].wav; the
# tests use none of them): mean over files of cmn(16k -> 8k -> 16k) - cmn(16k). Per-file
# standard deviations are 1.3-5.5, against shifts of up to 42. Added to the 16 kHz prior for
# 8 kHz sessions.
NARROWBAND_CMN_SHIFT = (
    -10.02, 33.54, -42.50, 36.50, -18.80, -3.67, 21.69, -29.54, 25.44, -13.06, -1.66, 12.55,
    -16.32,
)  # fmt: skip

# Decoder options asrd sets unless the operator does ([worker] engine_options), measured alone
# on this machine over the five LibriVox clips (71 words) and Debian pocketsphinx-testdata's
# cards/*.wav and goforward.raw (25 words; the tests use neither), in docs/benchmarks.md:
# * maxhmmpf caps the HMMs the search keeps active per frame (pocketsphinx's default: 30000).
#   It matters most at the start of an utterance, where every word of the lexicon is a
#   candidate: the costliest chunks, 200-400 ms into a sentence, take half the CPU. Live
#   and full_utt decodes run 20-25% faster with the same words on both sets. At 3000 one
#   word changes. With fwdflat off as well, decodes are 40% cheaper than pocketsphinx's
#   defaults.
# * fwdflat off skips the second, flat-lexicon search that end_utt() runs over the whole
#   utterance: end_utt() takes 0.002 x the utterance instead of 0.03 x, which is most of the
#   delay of a live final result. Errors on both sets together: 36 instead of 38 of 96 words
#   live, 20 instead of 21 with the batch final pass.
DECODER_DEFAULTS: Mapping[str, Any] = {"maxhmmpf": 5000, "fwdflat": False}

# final_pass = "adaptive": speech (model rate) whose CMN a session measures before its live
# decoder takes it and its finals come from the live search. pocketsphinx's own live CMN
# weighs its prior as 5 s of audio. The first 1 s was enough on the LibriVox clips, not on
# cards/*.wav (19.0% against 4.8%); 2 s was on both. The utterance that reaches it is decoded
# again from its start, so more costs more: ~0.15 x this in one go, once per session.
ADAPT_AFTER_S = 2.0

FINAL_PASSES = ("batch", "live", "adaptive")

# The batch decoder's one-word grammar, which measures an utterance's CMN (_measure_cmn).
_CMN_SEARCH = "asrd-cmn"

# GIL-holding work at the end of an utterance, per second of its audio, with room for a busy
# machine: a full_utt decode runs at ~0.1-0.13 x real time; the live search's end_utt
# (bestpath over the lattice, no fwdflat pass) at ~0.002 x.
_BATCH_FINAL_COST = 0.5
_LIVE_FINAL_COST = 0.1

# The decoder is fed in blocks of this many ms of model-rate audio, so that its results do not
# depend on how the client chunked the stream: pocketsphinx 5 gives (slightly) different
# segmentations when an utterance begins with a block shorter than ~30 ms.
_BLOCK_MS = 50

# Decoder options that name a file or directory pocketsphinx reads or writes. It checks few of
# them itself: a missing jsgf grammar segfaults it, a missing mdef, tmat, sendump or senmgau
# exits the process, a missing mixw is ignored, and a missing log directory fails every
# utterance's start_utt() (each session ends with 50000000) instead of the worker's start.
_INPUT_DIRS = ("hmm",)
_INPUT_FILES = (
    "allphone", "dict", "fdict", "featparams", "fsg", "jsgf", "kws", "lda", "lm", "lmctl",
    "mdef", "mean", "mixw", "mllr", "senmgau", "sendump", "tmat", "var",
)  # fmt: skip
_OUTPUT_DIRS = ("mfclogdir", "rawlogdir", "senlogdir")

# Numeric decoder options pocketsphinx takes without a word, then dies or hangs on (found by
# trying 0 and -1 for each of its numeric options on the bundled model): ncep 0 and maxwpf 0
# segfault, ds 0 raises SIGFPE at the first decode, logbase 0 or -1 segfaults, topn -1 and
# latsize 0 exit the process, lw 0 or -1 never returns from the first decode.
_LIMITS: dict[str, tuple[Callable[[float], bool], str]] = {
    "ncep": (lambda v: v >= 1, "at least 1"),
    "ds": (lambda v: v >= 1, "at least 1"),
    "topn": (lambda v: v >= 1, "at least 1"),
    "latsize": (lambda v: v >= 1, "at least 1"),
    "maxwpf": (lambda v: v == -1 or v >= 1, "-1 (no limit) or at least 1"),
    "logbase": (lambda v: v > 1, "above 1"),
    "lw": (lambda v: v > 0, "above 0"),
}

# Audio below 8 kHz lacks too much of the speech band; above 48 kHz nobody sends speech.
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000


def _clean_word(word: str) -> str | None:
    """Dictionary word -> output word; None for fillers (``<s>``, ``<sil>``, ``[NOISE]``).

    Fillers are recognised by their markup rather than by a list, so noise dictionaries of
    other models (``++BREATH++`` style) are handled too. ``and(2)`` -> ``and``: the suffix
    only names an alternate pronunciation.
    """
    if not word or word[0] in "<[+":
        return None
    if word[-1] == ")":
        open_at = word.rfind("(")
        if open_at > 0:
            return word[:open_at]
    return word


class PocketsphinxRecognizer:
    """One preloaded decoder lent to one session; see :class:`asrd.engines.Recognizer`."""

    def __init__(
        self, engine: PocketsphinxEngine, decoder: Any, sample_rate: int, *, partials: bool = True
    ) -> None:
        self._engine: PocketsphinxEngine | None = engine
        # Batch finals: the final result comes from one full_utt decode of the utterance
        # (batch CMN, the offline accuracy); the live search then runs only for partials.
        # Adaptive: so until the session's CMN is measured (_calibrate, _adapt).
        self._batch = engine.final_pass != "live"
        self._early_final = engine.early_final
        self._final_pass = engine.final_pass
        self._live = partials or engine.final_pass != "batch"
        self._utterance = bytearray()  # model-rate audio of the utterance (batch finals)
        # The final pass pause() ran (its result and batch CMN), until more audio comes.
        self._early: tuple[Hypothesis, str] | None = None
        self._batch_cmn = decoder.get_cmn()  # the session's prior, set by acquire()
        # Adaptive: the CMN measured so far, summed over its samples, and those samples.
        self._cmn_sum: list[float] | None = [] if engine.final_pass == "adaptive" else None
        self._cmn_samples = 0
        self._adapt_samples = int(ADAPT_AFTER_S * engine.model_rate)
        # The CMN each utterance of the live search starts from, with a fresh noise estimate:
        # what the last one ended with. So an utterance's result depends on this string and
        # its audio alone, and the session's ``state`` is all another worker needs. None
        # while the batch pass makes the finals.
        self._next_cmn: str | None = self._batch_cmn if engine.final_pass == "live" else None
        self._decoder = decoder
        self.sample_rate = sample_rate
        self._model_rate = engine.model_rate
        self._frame_rate = engine.frame_rate
        self._block = engine.model_rate * 2 * _BLOCK_MS // 1000
        self._resampler: Resampler | None = None
        self._pending = bytearray()  # model-rate audio not yet given to the decoder
        self._in_utterance = False
        self._samples = 0  # model-rate samples fed in this utterance
        self._partial_frames = -1  # n_frames() when _partial was computed
        self._partial: Hypothesis | None = None

    # --- Recognizer protocol ---------------------------------------------------------------

    @property
    def final_cost(self) -> float:
        return _BATCH_FINAL_COST if self._batch else _LIVE_FINAL_COST

    @property
    def early_final(self) -> bool:
        return self._batch and self._early_final

    @property
    def state(self) -> str:
        """``cmn:<mean>``: the CMN the live search's next utterance starts from (``live``, and
        ``adaptive`` once measured); ``measuring:<samples>:<sums>``: ``adaptive``'s CMN
        measured so far; ``""`` with ``batch``, whose finals start from the session's prior."""
        if self._next_cmn is not None:
            return f"cmn:{self._next_cmn}"
        if self._cmn_sum:
            sums = ",".join(repr(t) for t in self._cmn_sum)
            return f"measuring:{self._cmn_samples}:{sums}"
        return ""

    def _restore(self, state: str) -> None:
        """Take over a session's ``state`` from another worker; ValueError if unreadable."""
        kind, _, rest = state.partition(":")
        coefficients = self._batch_cmn.count(",") + 1

        def vector(text: str) -> str:
            values = _cmn_prior(text, "state")
            if values.count(",") + 1 != coefficients:
                raise ValueError(f"state: not {coefficients} coefficients: {state[:80]!r}")
            return values

        if kind == "cmn" and self._next_cmn is not None:  # live
            self._next_cmn = vector(rest)
        elif kind == "cmn" and self._cmn_sum is not None:  # adaptive: measured already
            self._next_cmn = vector(rest)
            self._batch = False
            self._cmn_sum = None
        elif kind == "measuring" and self._cmn_sum is not None:
            samples, _, sums = rest.partition(":")
            if not samples.isdigit():
                raise ValueError(f"state: malformed {state[:80]!r}")
            self._cmn_sum = [float(v) for v in vector(sums).split(",")]
            self._cmn_samples = int(samples)
        else:
            raise ValueError(f"state {state[:40]!r} is not for final_pass {self._final_pass!r}")

    def start(self) -> None:
        decoder = self._live_decoder()
        if self._in_utterance:
            raise RuntimeError("start() while an utterance is in progress")
        if self.sample_rate != self._model_rate:
            self._resampler = Resampler(self.sample_rate, self._model_rate)
        self._pending.clear()
        self._utterance.clear()
        self._early = None
        self._samples = 0
        self._partial_frames = -1
        self._partial = None
        if self._live:
            try:
                if self._next_cmn is not None:
                    _restart_stream(decoder, self._next_cmn)
                decoder.start_utt()
            except RuntimeError as exc:
                raise EngineFailed(f"pocketsphinx start_utt failed: {exc}") from exc
        self._in_utterance = True

    def accept(self, pcm: bytes) -> None:
        """Buffer and decode in whole blocks of ``_BLOCK_MS``, whatever the chunk sizes."""
        self._require_utterance("accept")
        if pcm:
            self._early = None  # the pause is over: its final pass is void
        pending = self._pending
        pending += pcm if self._resampler is None else self._resampler.process(pcm)
        blocks = len(pending) // self._block
        if blocks:
            size = self._block
            for k in range(blocks):
                self._feed(bytes(pending[k * size : (k + 1) * size]))
            del pending[: blocks * size]
            if self._cmn_sum is not None and self._cmn_samples + self._samples >= (
                self._adapt_samples
            ):
                self._adapt()

    def partial(self) -> Hypothesis | None:
        """Best path so far, from the decoder's backpointer table (~0.1 ms).

        Its ``confidence`` is 0.0: pocketsphinx computes word posteriors only from the
        lattice built when the utterance ends, so a partial has no confidence to report.
        """
        if not (self._in_utterance and self._live):
            return None
        decoder = self._live_decoder()
        frames = decoder.n_frames()
        if frames != self._partial_frames:
            self._partial_frames = frames
            words, _ = self._words(decoder.seg(), self._samples)
            self._partial = _hypothesis(words, 0.0) if words else None
        return self._partial

    def pause(self) -> None:
        """With an early final pass, run the batch pass now on the utterance as ``finish()``
        would see it if no more audio came; ``finish()`` then returns its result, and
        ``accept()`` voids it. The rest of the pause is never sent (``trailing_silence_ms``),
        so when the pause closes the sentence, the final is ready or well under way."""
        self._require_utterance("pause")
        if not self.early_final:
            return
        pending = self._pending
        if self._resampler is not None:  # its flush, on a copy: the stream may go on
            pending = pending + copy.copy(self._resampler).flush()
        tail = bytes(pending[: len(pending) - len(pending) % 2])
        self._early = self._batch_final(
            bytes(self._utterance) + tail, self._samples + len(tail) // 2
        )

    def finish(self) -> Hypothesis:
        """End the utterance; confidence is the mean word posterior (see ``_words``)."""
        self._require_utterance("finish")
        decoder = self._live_decoder()
        if self._resampler is not None:
            self._pending += self._resampler.flush()
            self._resampler = None
        tail = bytes(self._pending[: len(self._pending) - len(self._pending) % 2])
        self._pending.clear()
        self._feed(tail)
        self._in_utterance = False
        early, self._early = self._early, None
        try:
            if self._live:
                decoder.end_utt()
        except RuntimeError as exc:
            self._utterance.clear()
            raise EngineFailed(f"pocketsphinx final decode failed: {exc}") from exc
        if self._batch:
            try:
                # the pass pause() ran, if no audio came after it
                hyp, cmn = early or self._batch_final(bytes(self._utterance), self._samples)
            finally:
                self._utterance.clear()
            if self._cmn_sum is not None:
                self._calibrate(cmn, self._samples)
                if self._cmn_samples >= self._adapt_samples:
                    self._next_cmn = self._measured_cmn()  # between utterances
            return hyp
        if self._next_cmn is not None:
            self._next_cmn = str(decoder.get_cmn())
        words, probs = self._words(decoder.seg(), self._samples)
        return _hypothesis(words, sum(probs) / len(probs)) if words else EMPTY_HYPOTHESIS

    def _batch_final(self, pcm: bytes, samples: int) -> tuple[Hypothesis, str]:
        """The final result of ``pcm``, the whole utterance, by one full-utterance decode, and
        the utterance's CMN it measured."""
        assert self._engine is not None
        if not pcm:
            return EMPTY_HYPOTHESIS, self._batch_cmn  # an utterance with no audio: nothing
        try:
            decoder = self._engine._batch_decode(pcm, self._batch_cmn)
        except RuntimeError as exc:
            raise EngineFailed(f"pocketsphinx final decode failed: {exc}") from exc
        words, probs = self._words(decoder.seg(), samples)
        hyp = _hypothesis(words, sum(probs) / len(probs)) if words else EMPTY_HYPOTHESIS
        return hyp, decoder.get_cmn()

    def _calibrate(self, cmn: str, samples: int) -> None:
        """Adaptive: add the CMN measured on ``samples`` of the session's speech."""
        assert self._cmn_sum is not None
        if not samples:
            return
        values = [float(v) for v in cmn.split(",")]
        if not self._cmn_sum:
            self._cmn_sum = [0.0] * len(values)
        self._cmn_sum = [t + v * samples for t, v in zip(self._cmn_sum, values, strict=True)]
        self._cmn_samples += samples

    def _measured_cmn(self) -> str:
        """Adaptive, once ``ADAPT_AFTER_S`` is measured: the sample-weighted mean CMN, for the
        live decoder. The batch passes stop here; the live search makes every later final."""
        assert self._cmn_sum is not None
        n = self._cmn_samples
        cmn = ",".join(f"{t / n:.4f}" for t in self._cmn_sum)
        self._batch = False
        self._cmn_sum = None
        return cmn

    def _adapt(self) -> None:
        """Adaptive, mid-utterance: with this utterance's speech so far the session has
        ``ADAPT_AFTER_S`` of it. Measure the CMN of the part that makes it up (no search, a
        few ms), and decode the utterance again from its start with the measured CMN: what
        the prior's CMN decoded is thrown away, and this utterance's final is the live
        search's already. Exactly that part, not all the audio so far: how the stream was cut
        into messages (a replay merges them) must not change the CMN."""
        assert self._engine is not None
        pcm = bytes(self._utterance)
        needed = self._adapt_samples - self._cmn_samples
        try:
            measured = self._engine._measure_cmn(pcm[: 2 * needed], self._batch_cmn)
            self._calibrate(measured, needed)
            decoder = self._live_decoder()
            decoder.end_utt()
            self._next_cmn = self._measured_cmn()
            _restart_stream(decoder, self._next_cmn)
            decoder.start_utt()
            for i in range(0, len(pcm), self._block):  # the blocks it had the first time
                decoder.process_raw(pcm[i : i + self._block])
        except RuntimeError as exc:
            raise EngineFailed(f"pocketsphinx decode failed: {exc}") from exc
        finally:
            self._utterance.clear()
        self._early = None
        self._partial_frames = -1

    # --- engine side -----------------------------------------------------------------------

    def _lent_by(self, engine: PocketsphinxEngine) -> bool:
        return self._engine is engine

    def _close(self) -> Any:
        """Detach from the decoder (ending an unfinished utterance) and return it."""
        decoder = self._live_decoder()
        if self._in_utterance:
            self._in_utterance = False
            self._resampler = None
            self._pending.clear()
            self._utterance.clear()
            self._early = None
            if not self._live:
                return self._detach(decoder)
            try:
                decoder.end_utt()
            except RuntimeError:
                pass  # the result is thrown away; the next start_utt() resets the decoder
        return self._detach(decoder)

    def _detach(self, decoder: Any) -> Any:
        self._engine = None
        self._decoder = None
        return decoder

    def _live_decoder(self) -> Any:
        if self._decoder is None:
            raise RuntimeError("recognizer used after release()")
        return self._decoder

    def _require_utterance(self, what: str) -> None:
        self._live_decoder()
        if not self._in_utterance:
            raise RuntimeError(f"{what}() outside an utterance; call start() first")

    def _feed(self, pcm: bytes) -> None:
        if not pcm:
            return
        self._samples += len(pcm) // 2
        if self._batch:
            self._utterance += pcm
        if not self._live:
            return
        try:
            self._decoder.process_raw(pcm)
        except RuntimeError as exc:
            raise EngineFailed(f"pocketsphinx process_raw failed: {exc}") from exc

    def _words(self, segments: Any, samples: int) -> tuple[list[EngineWord], list[float]]:
        """Real words of a segmentation with times in ms, and their posteriors.

        ``Segment.prob`` is ``exp`` of pocketsphinx's ``ps_seg_prob``. After ``end_utt`` with
        ``bestpath`` on (the default) that is the word's posterior probability in the word
        lattice, P(word at these frames | audio), computed by forward-backward over all the
        competing paths: low when other words fit the same stretch of audio about as well.
        Mid-utterance it comes from the backpointer table and is always 1.0.
        """
        words: list[EngineWord] = []
        probs: list[float] = []
        if segments is None:  # no hypothesis yet
            return words, probs
        per_frame = 1000 / self._frame_rate
        audio_ms = samples * 1000 // self._model_rate
        for seg in segments:
            text = _clean_word(seg.word)
            if text is None:
                continue
            start_ms = min(round(seg.start_frame * per_frame), audio_ms)
            # end_frame is inclusive.
            end_ms = min(round((seg.end_frame + 1) * per_frame), audio_ms)
            words.append(EngineWord(text, start_ms, max(start_ms, end_ms)))
            # Log-domain arithmetic (base 1.0001) can overshoot 1.0 by a few 1e-4.
            probs.append(min(1.0, max(0.0, seg.prob)))
        return words, probs


def _cmn_prior(text: object, what: str) -> str:
    """A CMN prior (``cmninit``) in the only form pocketsphinx reads right: numbers joined by
    bare commas. It reads anything else without a word as something else: ``"40, 3, -1"`` as
    ``40,0,0,...`` (a space ends the number list), ``"abc"`` as all zeros."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}")
    return ",".join(repr(v) for v in values)


def _check_options(config: Mapping[str, Any]) -> None:
    """Refuse, before pocketsphinx sees them, a path option whose file or directory is not
    there and a numeric value it would die on (``_LIMITS``)."""
    for key, value in config.items():
        if key in _LIMITS:
            ok, what = _LIMITS[key]
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a number, got {value!r}") from None
            if not (math.isfinite(number) and ok(number)):
                raise ValueError(f"{key} must be {what}, got {value!r}")
        if key in _INPUT_FILES and not os.path.isfile(str(value)):
            raise ValueError(f"{key}: no such file: {value!r}")
        if key in _INPUT_DIRS + _OUTPUT_DIRS and not os.path.isdir(str(value)):
            raise ValueError(f"{key}: no such directory: {value!r}")


def _restart_stream(decoder: Any, cmn: str) -> None:
    """A fresh noise estimate and CMN ``cmn``: what a session's first utterance starts from.
    (pocketsphinx 5 calls start_stream deprecated, but without it the noise statistics of
    the audio before change the result.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        decoder.start_stream()
    decoder.set_cmn(cmn)


def _decode_whole(decoder: Any, pcm: bytes, cmn: str) -> None:
    """One full-utterance decode (batch CMN) from a session's initial state, ``cmn``."""
    _restart_stream(decoder, cmn)
    decoder.start_utt()
    try:
        decoder.process_raw(pcm, False, True)
    finally:
        decoder.end_utt()  # or the shared batch decoder stays mid-utterance for good


def _add_cmn_search(decoder: Any) -> None:
    """Give ``decoder`` a grammar of one word (the dictionary's first) as ``_CMN_SEARCH``."""
    with open(str(decoder.config["dict"]), encoding="utf-8", errors="replace") as f:
        word = next((line.split()[0] for line in f if line.strip()), None)
    if word is None:
        raise ValueError(f"dict {decoder.config['dict']!r} has no words")
    fsg = decoder.create_fsg(_CMN_SEARCH, 0, 1, [(0, 1, 1.0, word)])
    decoder.add_fsg(_CMN_SEARCH, fsg)


def _shifted(cmn: str, shift: Sequence[float]) -> str:
    values = [float(v) for v in cmn.split(",")]
    if len(values) != len(shift):
        raise ValueError(f"CMN prior has {len(values)} coefficients, shift {len(shift)}")
    return ",".join(f"{v + d:.2f}" for v, d in zip(values, shift, strict=True))


def _hypothesis(words: list[EngineWord], confidence: float) -> Hypothesis:
    return Hypothesis(" ".join(w.text for w in words), tuple(words), confidence)


class PocketsphinxEngine:
    """A pool of ``decoders`` preloaded pocketsphinx decoders; see :class:`asrd.engines.Engine`.

    ``config`` goes to ``pocketsphinx.Decoder`` (e.g. ``hmm``, ``lm``, ``dict``, ``beam``,
    ``cmninit``); the defaults are the bundled US-English model and
    :data:`DECODER_DEFAULTS`. Audio at other rates than
    the model's (``samprate``, 16 kHz for the bundled model) is resampled.
    ``cmninit_by_rate`` maps an input sample rate to the CMN prior of sessions at that rate
    (comma-separated, like ``cmninit``); by default 8 kHz sessions of the bundled model get
    ``cmninit`` shifted by :data:`NARROWBAND_CMN_SHIFT`, every other rate ``cmninit``. A prior
    pocketsphinx would misread (not numbers, more than the model's coefficients) is a ValueError.
    ``final_pass`` is ``"batch"`` (final results from a full-utterance decode with batch CMN:
    offline accuracy, at the cost of ~0.1 x the utterance length of extra CPU and latency when
    it ends), ``"live"`` (the streaming search's own result: no extra cost, lower accuracy
    where the session's channel is far from the CMN prior) or ``"adaptive"`` (live, once the
    session's CMN is measured on its first :data:`ADAPT_AFTER_S` of speech; batch for
    utterances that end before: about the batch accuracy at the live cost; see the module
    notes).
    ``early_final`` (batch passes only) runs that pass at a pause
    (:meth:`PocketsphinxRecognizer.pause`) rather than when the sentence closes: the final
    comes up to the rest of the closing pause sooner, and a pause that does not close the
    sentence costs a pass thrown away.
    """

    name = "pocketsphinx"

    def __init__(
        self,
        decoders: int,
        *,
        loglevel: str = "ERROR",
        cmninit_by_rate: Mapping[int, str] | None = None,
        final_pass: str = "adaptive",
        early_final: bool = True,
        **config: Any,
    ) -> None:
        if final_pass not in FINAL_PASSES:
            raise ValueError(f"final_pass must be one of {FINAL_PASSES}, got {final_pass!r}")
        self.final_pass = final_pass
        self.early_final = final_pass != "live" and early_final
        if decoders < 1:
            raise ValueError(f"decoders must be at least 1, got {decoders}")
        config = {**DECODER_DEFAULTS, **config}
        if "cmninit" in config:
            config["cmninit"] = _cmn_prior(config["cmninit"], "cmninit")
        if not isinstance(cmninit_by_rate, Mapping | None):
            raise ValueError(f"cmninit_by_rate must map rates to priors: {cmninit_by_rate!r}")
        priors = {
            rate: _cmn_prior(cmn, f"cmninit_by_rate[{rate}]")
            for rate, cmn in (cmninit_by_rate or {}).items()
        }
        _check_options(config)
        self._free: list[Any] = []
        try:
            first = pocketsphinx.Decoder(loglevel=loglevel, **config)
        except (KeyError, ValueError, RuntimeError) as exc:  # unknown key, bad value, no model
            raise ValueError(f"pocketsphinx refused the decoder options {config}: {exc}") from exc
        coefficients = first.get_cmn().count(",") + 1
        named = {f"cmninit_by_rate[{rate}]": cmn for rate, cmn in priors.items()}
        for what, cmn in {"cmninit": config.get("cmninit", ""), **named}.items():
            if cmn.count(",") >= coefficients:  # pocketsphinx would drop the rest silently
                raise ValueError(f"{what} has more than the model's {coefficients} coefficients")
        self._free.append(first)
        for _ in range(decoders - 1):
            self._free.append(pocketsphinx.Decoder(loglevel=loglevel, **config))
        self.capacity = decoders
        self.model_rate = int(first.config["samprate"])
        self.frame_rate = int(first.config["frate"])
        # Posteriors (our confidence) need the lattice pass; say so rather than report 1.0.
        if not first.config["bestpath"]:
            warnings.warn(
                "bestpath is off: pocketsphinx computes no word posteriors, "
                "every confidence will be 1.0",
                stacklevel=2,
            )
        self._prior_cmn: str = first.get_cmn()
        # One extra decoder per engine (the worker is single-threaded) runs the batch final
        # passes. The live decoders cannot: a live pass leaves state behind (beyond CMN and
        # the noise estimate) that costs a following full_utt decode 3-4 WER points.
        self._batch_decoder = (
            pocketsphinx.Decoder(loglevel=loglevel, **config) if final_pass != "live" else None
        )
        self._lm_search = ""
        if self._batch_decoder is not None:
            self._lm_search = str(self._batch_decoder.current_search())
            if final_pass == "adaptive":
                _add_cmn_search(self._batch_decoder)
        if cmninit_by_rate is None and "hmm" not in config and self.model_rate == 16000:
            priors[8000] = _shifted(self._prior_cmn, NARROWBAND_CMN_SHIFT)
        self._cmn_by_rate = priors

    @property
    def available(self) -> int:
        """Recognizers that can be acquired now."""
        return len(self._free)

    def acquire(
        self, sample_rate: int, *, partials: bool = True, state: str = ""
    ) -> PocketsphinxRecognizer:
        if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise UnsupportedSampleRate(
                f"sample rate {sample_rate} Hz not supported "
                f"({MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz)"
            )
        if not self._free:
            raise EngineFull(f"all {self.capacity} pocketsphinx decoders are busy")
        decoder = self._free.pop()
        # A new session starts from the model's prior, not from the last speaker's channel.
        _restart_stream(decoder, self._cmn_by_rate.get(sample_rate, self._prior_cmn))
        rec = PocketsphinxRecognizer(self, decoder, sample_rate, partials=partials)
        if state:
            try:
                rec._restore(state)
            except ValueError as exc:  # another engine's, or another final pass's
                log.warning("session state ignored, starting from the prior: %s", exc)
        return rec

    def _measure_cmn(self, pcm: bytes, cmn: str) -> str:
        """The batch CMN of ``pcm``, measured through a one-word grammar: the features and
        their mean are those of a batch pass, the search over them almost nothing."""
        decoder = self._batch_decoder
        assert decoder is not None
        decoder.activate_search(_CMN_SEARCH)
        try:
            _decode_whole(decoder, pcm, cmn)
            return str(decoder.get_cmn())
        finally:
            decoder.activate_search(self._lm_search)

    def _batch_decode(self, pcm: bytes, cmn: str) -> Any:
        """Decode a whole utterance from the session's initial state; return the decoder."""
        decoder = self._batch_decoder
        assert decoder is not None
        _decode_whole(decoder, pcm, cmn)
        return decoder

    def release(self, recognizer: Recognizer) -> None:
        if not isinstance(recognizer, PocketsphinxRecognizer) or not recognizer._lent_by(self):
            raise ValueError("release() of a recognizer not lent by this engine (or twice)")
        self._free.append(recognizer._close())
