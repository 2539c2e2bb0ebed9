"""``asrd bench --engine-baseline``: what pocketsphinx alone can do on this machine.

Two measurements, both single-threaded CPU time (``time.process_time``) in this process,
with no gateway, bus or worker involved:

* **Raw decoder.** Each recording through a fresh ``pocketsphinx.Decoder`` (with the
  worker's :data:`~asrd.engines.pocketsphinx.DECODER_DEFAULTS`): live, in 100 ms
  chunks with a partial hypothesis every 200 ms (what a worker does for a session with
  intermediate results), and in one ``full_utt`` call (the batch final pass of
  ``[worker] final_pass = "batch"``, and of ``"adaptive"``, the default, for a session's
  sentences that end within its first 2 s of speech). Real-time factor RTF = CPU seconds / audio
  seconds; a core sustains ``1 / RTF`` streams. With the batch final pass every utterance
  costs both: ``1 / (RTF_live + RTF_batch)``.
* **The bench workload.** The sessions ``asrd bench`` streams (recordings separated by
  silence, each session at least ``--duration`` long, one starting at each recording) through
  the gateway's own segmenter and the worker's own engine class
  (:class:`~asrd.engines.pocketsphinx.PocketsphinxEngine`, same final pass), one recogniser
  per session, i.e. exactly the recognition work of the bench's sessions, per second of
  streamed audio. Silence between sentences costs nothing there, so this is the engine's own
  limit for the service figures of the same run: ``streams per core = 1 / (engine CPU per
  stream second)``. Whole sessions, because some work comes once per session: ``adaptive``
  decodes the sentence that reaches 2 s of speech twice.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from asrd.bench.corpus import Corpus, Playlist
from asrd.engines.base import Hypothesis, Recognizer
from asrd.wer import wer
from asrd.worker import EarlyFinals

__all__ = ["Baseline", "feed_events", "run_baseline"]

CHUNK_MS = 100
PARTIAL_MS = 200


@dataclass(frozen=True)
class Baseline:
    audio_s: float  # speech decoded per repetition (sum of the recordings)
    rtf_live: float  # live decode, 100 ms chunks, partials every 200 ms
    rtf_batch: float  # one full_utt call per recording
    wer_live: float
    wer_batch: float
    workload_audio_s: float  # stream seconds of the bench sessions decoded
    workload_cpu_per_s: float  # engine CPU per stream second, bench workload, final pass as set
    final_pass: str
    trailing_silence_ms: int  # the segmenter's, as in the service
    session_s: float  # the bench sessions' least duration (--duration)
    cores: int
    repeat: int  # of the raw decoder measurements; the workload is decoded once

    @property
    def streams_per_core_live(self) -> float:
        return 1.0 / self.rtf_live

    @property
    def streams_per_core_live_plus_batch(self) -> float:
        return 1.0 / (self.rtf_live + self.rtf_batch)

    @property
    def workload_streams_per_core(self) -> float:
        return 1.0 / self.workload_cpu_per_s if self.workload_cpu_per_s > 0 else float("inf")

    @property
    def engine_limit_streams(self) -> float:
        """Concurrent bench sessions the engine alone could hold on all cores."""
        return self.workload_streams_per_core * self.cores

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["streams_per_core_live"] = round(self.streams_per_core_live, 2)
        d["streams_per_core_live_plus_batch"] = round(self.streams_per_core_live_plus_batch, 2)
        d["workload_streams_per_core"] = round(self.workload_streams_per_core, 2)
        d["engine_limit_streams"] = round(self.engine_limit_streams, 1)
        for key in ("rtf_live", "rtf_batch", "wer_live", "wer_batch", "workload_cpu_per_s"):
            d[key] = round(d[key], 4)
        return d


def _decode_live(decoder: Any, pcm: bytes, sample_rate: int) -> str:
    chunk = 2 * sample_rate * CHUNK_MS // 1000
    every = PARTIAL_MS // CHUNK_MS
    decoder.start_utt()
    for k, i in enumerate(range(0, len(pcm), chunk), 1):
        decoder.process_raw(pcm[i : i + chunk])
        if k % every == 0:
            decoder.hyp()
            decoder.seg()
    decoder.end_utt()
    hyp = decoder.hyp()
    return str(hyp.hypstr) if hyp is not None else ""


def _decode_batch(decoder: Any, pcm: bytes) -> str:
    decoder.start_utt()
    decoder.process_raw(pcm, False, True)
    decoder.end_utt()
    hyp = decoder.hyp()
    return str(hyp.hypstr) if hyp is not None else ""


def _raw(corpus: Corpus, live: bool) -> tuple[float, float]:
    """(CPU seconds, WER) of decoding every recording with a fresh decoder each."""
    import pocketsphinx

    from asrd.engines.pocketsphinx import DECODER_DEFAULTS

    cpu = 0.0
    hyps: list[str] = []
    for clip in corpus.clips:
        # The worker's own decoder settings; creation is not timed.
        decoder = pocketsphinx.Decoder(loglevel="ERROR", **DECODER_DEFAULTS)
        t = time.process_time()
        if live:
            hyps.append(_decode_live(decoder, clip.pcm, corpus.sample_rate))
        else:
            hyps.append(_decode_batch(decoder, clip.pcm))
        cpu += time.process_time() - t
    return cpu, wer([c.reference for c in corpus.clips], hyps)


class EventFeeder:
    """Segmenter events into one recogniser as a worker feeds them: a partial every ``step``
    bytes of an utterance's audio. One per stream, so that several can take turns."""

    def __init__(self, rec: Recognizer, step: int) -> None:
        self.rec = rec
        self.step = step
        self.fed = self.next_partial = 0
        self.finals: list[Hypothesis] = []
        self.early = EarlyFinals()
        self.early_used = 0  # final results that came from the pass run at the pause

    def feed(self, ev: object) -> None:
        from asrd.segmentation import (
            UtteranceAudio,
            UtteranceEnded,
            UtterancePaused,
            UtteranceStarted,
        )

        if isinstance(ev, UtteranceStarted):
            self.rec.start()
            self.fed, self.next_partial = 0, self.step
        elif isinstance(ev, UtteranceAudio):
            self.early.heard(len(ev.pcm))
            self.rec.accept(ev.pcm)
            self.fed += len(ev.pcm)
            if self.fed >= self.next_partial:
                self.next_partial = self.fed + self.step
                self.rec.partial()
        elif isinstance(ev, UtterancePaused):
            if self.rec.early_final and self.early.allowed():  # as a worker runs it
                self.rec.pause()
                self.early.ran(self.fed)
        elif isinstance(ev, UtteranceEnded):
            self.early_used += self.early.ended()
            self.finals.append(self.rec.finish())


def feed_events(rec: Recognizer, events: Iterable[object], step: int) -> None:
    """All of one stream's segmenter events, back to back (see :class:`EventFeeder`)."""
    feeder = EventFeeder(rec, step)
    for ev in events:
        feeder.feed(ev)


def _workload(
    corpus: Corpus, final_pass: str, gap_ms: int, mss_ms: int, tail_ms: int, session_s: float
) -> tuple[float, float]:
    """(CPU seconds, stream seconds) of the engine work of one bench session starting at each
    recording, built as the bench builds its own (:func:`asrd.bench.load.playlists_for`).

    Each used to be one recording long, so ``adaptive``'s once-per-session work (the sentence
    that reaches 2 s of speech, decoded twice) was charged to every recording: the engine's
    cost per stream-second came out 16-34% too high, and the service's ratios to it as much
    too favourable (docs/benchmarks.md, "The engine baseline decodes whole sessions")."""
    from asrd.engines.pocketsphinx import PocketsphinxEngine
    from asrd.segmentation import Segmenter, SegmenterConfig

    engine = PocketsphinxEngine(decoders=1, final_pass=final_pass)
    step = 2 * corpus.sample_rate * PARTIAL_MS // 1000
    cpu = 0.0
    stream_s = 0.0
    for first in range(len(corpus.clips)):
        playlist = Playlist.build(
            corpus, first=first, min_duration_s=session_s, gap_ms=gap_ms, frame_ms=CHUNK_MS
        )
        stream_s += playlist.duration_s
        segmenter = Segmenter(
            SegmenterConfig(
                sample_rate=corpus.sample_rate,
                max_sentence_silence_ms=mss_ms,
                trailing_silence_ms=tail_ms,
            )
        )
        events = [ev for frame in playlist.frames for ev in segmenter.feed(frame)]
        events += segmenter.flush()  # segmentation is gateway work: not timed
        rec = engine.acquire(corpus.sample_rate, partials=True)
        t = time.process_time()
        feed_events(rec, events, step)
        cpu += time.process_time() - t
        engine.release(rec)
    return cpu, stream_s


def run_baseline(
    corpus: Corpus,
    *,
    final_pass: str = "adaptive",
    gap_ms: int = 1500,
    max_sentence_silence_ms: int = 800,
    trailing_silence_ms: int = 300,
    session_s: float = 30.0,
    repeat: int = 3,
) -> Baseline:
    """Measure the raw decoder ``repeat`` times and keep the median of each CPU figure; decode
    the bench sessions once (one starting at each recording, each ``session_s`` long at
    least: with a capacity search's 60 s, ten times the corpus)."""
    live: list[float] = []
    batch: list[float] = []
    wer_live = wer_batch = 0.0
    for _ in range(max(1, repeat)):
        cpu, wer_live = _raw(corpus, live=True)
        live.append(cpu)
        cpu, wer_batch = _raw(corpus, live=False)
        batch.append(cpu)
    work, stream_s = _workload(
        corpus, final_pass, gap_ms, max_sentence_silence_ms, trailing_silence_ms, session_s
    )
    audio_s = corpus.seconds
    return Baseline(
        audio_s=round(audio_s, 3),
        rtf_live=statistics.median(live) / audio_s,
        rtf_batch=statistics.median(batch) / audio_s,
        wer_live=wer_live,
        wer_batch=wer_batch,
        workload_audio_s=round(stream_s, 3),
        workload_cpu_per_s=work / stream_s,
        final_pass=final_pass,
        trailing_silence_ms=trailing_silence_ms,
        session_s=session_s,
        cores=os.cpu_count() or 1,
        repeat=max(1, repeat),
    )
