"""Sentence bookkeeping of one session: ordering and stream times of result events.

The segmenter may open sentence n+1 while the engine still decodes sentence n, and results of
a sentence may come twice after a worker failover. This pure state machine makes the client see
``SentenceBegin(n) [ResultChanged(n)...] SentenceEnd(n) SentenceBegin(n+1) ...`` exactly once
each, with engine word times (relative to the utterance audio) turned into stream times.
"""

from __future__ import annotations

from dataclasses import dataclass

from asrd import wire
from asrd.events import ResultChanged, SentenceBegin, SentenceEnd, ServerEvent, Word
from asrd.params import SessionParams
from asrd.textproc import postprocess


@dataclass(slots=True)
class _Sentence:
    index: int
    begin_ms: int
    audio_start_ms: int
    end_ms: int | None = None
    timed_out: bool = False
    begun: bool = False  # SentenceBegin sent
    partial: str = ""  # text of the last ResultChanged sent
    partial_ms: int = -1  # and its time


class SentenceTracker:
    def __init__(self, params: SessionParams) -> None:
        self.params = params
        self._open: dict[int, _Sentence] = {}  # begun or waiting, not yet finalised
        self._next_to_begin = 1  # lowest index whose SentenceBegin is not sent
        self.finalized = 0  # highest finalised index (they finalise in order)

    @property
    def idle(self) -> bool:
        """No sentence is waiting for its final result."""
        return not self._open

    def begin(self, index: int, begin_ms: int, audio_start_ms: int) -> list[ServerEvent]:
        self._open[index] = _Sentence(index, begin_ms, audio_start_ms)
        return self._release_begins()

    def end(self, index: int, end_ms: int, timed_out: bool) -> None:
        s = self._open[index]
        s.end_ms, s.timed_out = end_ms, timed_out

    def result(self, r: wire.Result) -> list[ServerEvent]:
        s = self._open.get(r.utt)
        if s is None or r.utt <= self.finalized:
            return []  # duplicate after a replay, or unknown
        if not r.final:
            if not (self.params.enable_intermediate_result and s.begun):
                return []
            time_ms = s.audio_start_ms + r.audio_ms
            if time_ms <= s.partial_ms:
                # After a failover the new worker decodes the sentence again from its start:
                # its partials cover less than the client has seen. Time never goes back.
                return []
            text, words = self._words(r, s)
            # The engine sends a partial when its text changed; after the client's filters
            # that text may not have ("hello" -> "hello uh" with disfluency) or be empty.
            if text == s.partial:
                return []
            s.partial, s.partial_ms = text, time_ms
            return [ResultChanged(s.index, time_ms, text, words)]
        if s.end_ms is None:
            return []  # a final for an utterance we have not closed: ignore (cannot happen)
        out: list[ServerEvent] = []
        if not s.begun:
            out += self._release_begins()
        text, words = self._words(r, s)
        # NaN (an engine's 0/0; JSON on the bus carries it) is no confidence: 0.0, not 1.0.
        confidence = min(1.0, r.confidence) if r.confidence > 0.0 else 0.0
        end = SentenceEnd(
            s.index,
            s.end_ms,
            s.begin_ms,
            text,
            confidence,
            words,
            s.timed_out,
        )
        out.append(end)
        del self._open[r.utt]
        self.finalized = r.utt
        return out + self._release_begins()

    def _release_begins(self) -> list[ServerEvent]:
        """SentenceBegin(n) goes out only once sentence n-1 is finalised."""
        out: list[ServerEvent] = []
        s = self._open.get(self._next_to_begin)
        if s is not None and self._next_to_begin == self.finalized + 1 and not s.begun:
            s.begun = True
            out.append(SentenceBegin(s.index, s.begin_ms))
            self._next_to_begin += 1
        return out

    def _words(self, r: wire.Result, s: _Sentence) -> tuple[str, tuple[Word, ...]]:
        # The engine also hears the lead-in before the detected start (audio_start_ms <
        # begin_ms) and may place a word's start there: words begin no earlier than their
        # sentence's begin_time, as a client cutting the sentence's audio by it expects.
        base, begin = s.audio_start_ms, s.begin_ms
        if not r.words:
            # An engine may send text without word times (wire reads a result with no "words"): the
            # client's filters and punctuation still apply, to its words, with no times made up.
            text, _ = postprocess([Word(t, begin, begin) for t in r.text.split()], self.params)
            return text, ()
        # Nor past the audio the engine had (an engine's bug, or a foreign engine's), nor do
        # they end before they start: a client cuts the sentence's audio by them too.
        last = max(begin + 1, s.end_ms if s.end_ms is not None else base + r.audio_ms)
        words = []
        for t, a, b in r.words:
            start = min(max(base + a, begin), last)
            words.append(Word(t, start, min(max(base + b, start, begin + 1), last)))
        return postprocess(words, self.params)
