"""The recordings a benchmark streams, and each session's stream built from them.

A corpus is a directory of 16-bit PCM WAV files with reference transcripts in the Sphinx
``.transcription`` format (``<s> words </s> (file-stem)``), like ``tests/data`` of a repository
checkout. Every session streams a *playlist*: whole recordings, each followed by a gap of
digital silence long enough for the sentence to end by silence, until the requested
duration is reached. Session ``i`` starts at recording ``i mod n``, so concurrent sessions do
not all speak the same words at the same moment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from asrd.audio import read_wav_file
from asrd.resample import resample

__all__ = [
    "Clip",
    "Corpus",
    "Playlist",
    "default_data_dir",
    "load_corpus",
]

_TRANSCRIPT_LINE = re.compile(r"^(?P<text>.*)\((?P<id>[^()]+)\)\s*$")


def default_data_dir() -> Path:
    """``tests/data`` of the repository this package runs from (a checkout or editable install)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "tests" / "data"
        if candidate.is_dir():
            return candidate
    return Path("tests/data")


@dataclass(frozen=True, slots=True)
class Clip:
    name: str
    pcm: bytes  # 16-bit mono at the corpus rate
    reference: str  # normalised later by asrd.wer

    def duration_ms(self, sample_rate: int) -> int:
        return len(self.pcm) // 2 * 1000 // sample_rate


@dataclass(frozen=True)
class Corpus:
    clips: tuple[Clip, ...]
    sample_rate: int

    @property
    def seconds(self) -> float:
        return sum(len(c.pcm) for c in self.clips) / 2 / self.sample_rate


def _read_transcripts(directory: Path) -> dict[str, str]:
    refs: dict[str, str] = {}
    for path in sorted(directory.glob("*.transcription")):
        for line in path.read_text().splitlines():
            m = _TRANSCRIPT_LINE.match(line)
            if not m:
                continue
            words = [w for w in m.group("text").split() if w not in ("<s>", "</s>")]
            refs[m.group("id").strip()] = " ".join(words)
    return refs


def load_corpus(directory: str | Path, sample_rate: int = 16000) -> Corpus:
    """Every ``*.wav`` of ``directory`` that has a reference transcript, at ``sample_rate``.

    Raises ValueError when there is none.
    """
    directory = Path(directory)
    refs = _read_transcripts(directory)
    clips: list[Clip] = []
    for wav in sorted(directory.glob("*.wav")):
        if wav.stem not in refs:
            continue
        pcm, rate = read_wav_file(wav)
        if rate != sample_rate:
            pcm = resample(pcm, rate, sample_rate)
        clips.append(Clip(wav.stem, pcm, refs[wav.stem]))
    if not clips:
        raise ValueError(
            f"no recordings with reference transcripts in {directory} "
            "(need *.wav and a *.transcription file naming them)"
        )
    return Corpus(tuple(clips), sample_rate)


@dataclass(frozen=True, slots=True)
class PlaylistItem:
    clip: Clip
    start_ms: int  # stream time where the recording starts
    end_ms: int  # stream time where it ends (its trailing gap follows)


@dataclass(frozen=True)
class Playlist:
    """The audio of one session: recordings separated by silence, pre-sliced into frames."""

    items: tuple[PlaylistItem, ...]
    pcm: bytes
    sample_rate: int
    frame_ms: int

    @classmethod
    def build(
        cls,
        corpus: Corpus,
        *,
        first: int,
        min_duration_s: float,
        gap_ms: int,
        lead_ms: int = 300,
        frame_ms: int = 100,
    ) -> Playlist:
        """Recordings from ``first`` on (cyclically) until at least ``min_duration_s``.

        At least one recording; ``lead_ms`` of silence before the first; ``gap_ms`` after
        each. Only whole recordings are used, so every reference transcript applies in full.
        """
        rate = corpus.sample_rate
        if not 10 <= frame_ms <= 1000:
            raise ValueError("frame_ms must be 10..1000")
        parts: list[bytes] = [bytes(2 * (lead_ms * rate // 1000))]
        gap = bytes(2 * (gap_ms * rate // 1000))
        samples = len(parts[0]) // 2
        items: list[PlaylistItem] = []
        n = len(corpus.clips)
        i = first
        while not items or samples / rate < min_duration_s:
            clip = corpus.clips[i % n]
            start = samples
            samples += len(clip.pcm) // 2
            items.append(PlaylistItem(clip, start * 1000 // rate, samples * 1000 // rate))
            parts += [clip.pcm, gap]
            samples += len(gap) // 2
            i += 1
        return cls(tuple(items), b"".join(parts), rate, frame_ms)

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate

    @property
    def duration_ms(self) -> int:
        return len(self.pcm) // 2 * 1000 // self.sample_rate

    @cached_property
    def frames(self) -> tuple[bytes, ...]:
        size = 2 * (self.frame_ms * self.sample_rate // 1000)
        return tuple(self.pcm[i : i + size] for i in range(0, len(self.pcm), size))

    @cached_property
    def frame_samples(self) -> tuple[int, ...]:
        return tuple(len(f) // 2 for f in self.frames)

    def item_at(self, stream_ms: int) -> int:
        """Index of the recording a sentence beginning at ``stream_ms`` belongs to.

        A recording owns the stream from its start to the start of the next one (its gap
        included); anything before the first belongs to the first.
        """
        for k in range(len(self.items) - 1, -1, -1):
            if stream_ms >= self.items[k].start_ms:
                return k
        return 0

    def references(self) -> list[str]:
        return [item.clip.reference for item in self.items]
