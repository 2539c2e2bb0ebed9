"""What an engine is, as the worker sees it.

An :class:`Engine` owns a fixed pool of recognizers, preloaded because creating one is slow
(a pocketsphinx decoder: ~0.3 s and ~91 MB). A session acquires one recognizer for its whole
life, so per-speaker state (cepstral mean, noise estimate) carries from one utterance to the
next, and releases it at the end. What of it a recognizer needs to decode the session's next
utterances as it would (its ``state``) goes with each final result to the gateway, which
gives it to the next worker if the session moves. Recognizers are synchronous and CPU-bound:
they run in worker processes, never on the gateway's event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from asrd.errors import TooManyRequests

__all__ = ["Engine", "EngineFull", "EngineWord", "Hypothesis", "Recognizer"]


class EngineFull(TooManyRequests):
    """Every recognizer of the engine is taken; the worker must not have been picked."""


@dataclass(frozen=True, slots=True)
class EngineWord:
    """A recognised word; times in ms from the first sample of the utterance's audio."""

    text: str
    start_ms: int
    end_ms: int


@dataclass(frozen=True, slots=True)
class Hypothesis:
    """A recognition result; ``text`` is ``words`` joined by single spaces."""

    text: str
    words: tuple[EngineWord, ...]
    confidence: float  # 0.0 .. 1.0


EMPTY_HYPOTHESIS = Hypothesis(text="", words=(), confidence=0.0)


class Recognizer(Protocol):
    """Recognises one utterance at a time: ``start``, ``accept``..., ``finish``, repeat."""

    def start(self) -> None:
        """Begin an utterance; times of its words count from its first accepted sample."""
        ...

    def accept(self, pcm: bytes) -> None:
        """Feed PCM16LE mono at the acquired rate; any length, odd byte counts included."""
        ...

    def partial(self) -> Hypothesis | None:
        """The current best guess, or None before anything is recognised. Cheap."""
        ...

    @property
    def final_cost(self) -> float:
        """CPU seconds that ``finish()`` (or ``pause()``) may block for, per second of the
        utterance's audio, as this session stands: the worker announces a long pass, so that
        it is not taken for dead meanwhile."""
        ...

    @property
    def early_final(self) -> bool:
        """``pause()`` would run the final pass now (a separate pass, started early)."""
        ...

    def pause(self) -> None:
        """The utterance's speech paused: the audio accepted so far is all of it unless more
        comes. A recognizer with an early final pass (``early_final``) runs it now, so
        that ``finish()`` right after costs nothing; ``accept()`` voids it. Others do nothing.
        """
        ...

    def finish(self) -> Hypothesis:
        """End the utterance and return its final result."""
        ...

    @property
    def state(self) -> str:
        """Between utterances: what the session's next utterance starts from (a speaker's
        cepstral mean, say), as text for :meth:`Engine.acquire`, so that another worker
        decodes the rest of the session as this one would. ``""``: nothing to carry."""
        ...


class Engine(Protocol):
    """A pool of ``capacity`` recognizers of one kind."""

    name: str
    capacity: int
    # Some session's Recognizer.pause() may run its final pass: the worker asks its gateways
    # for pause hints.
    early_final: bool

    def acquire(self, sample_rate: int, *, partials: bool = True, state: str = "") -> Recognizer:
        """Take a free recognizer for audio at ``sample_rate``; raises :class:`EngineFull`.

        ``partials`` False lets an engine skip work that only intermediate results need.
        ``state`` is a :attr:`Recognizer.state` of the session from the worker that had it;
        one the engine cannot read (another engine's) is ignored.
        """
        ...

    def release(self, recognizer: Recognizer) -> None:
        """Give a recognizer back (ending any utterance in progress)."""
        ...
