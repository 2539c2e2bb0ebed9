"""Sentence segmentation: exact rules with a scripted detector, then real speech with webrtcvad.

The scripted detector reads its decision out of the audio itself (odd sample value = voiced),
and every frame carries its own index, so a test can check both the timing arithmetic and
exactly which frames each utterance received.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asrd.segmentation import (
    Segmenter,
    SegmenterConfig,
    SegmentEvent,
    UtteranceAudio,
    UtteranceEnded,
    UtterancePaused,
    UtteranceStarted,
    WebrtcVad,
    energy_gate_dbfs,
    webrtc_mode,
)
from tests.audio_fixtures import (
    Clip,
    assemble,
    load_clip,
    noise,
    silence,
    speech_bounds,
    to_array,
)

FRAME_MS = 30
# Defaults: 300 ms window of 10 frames, 6 voiced opens; 800 ms silence = 27 frames closes;
# of a pause, 300 ms = 10 frames go out at once, the rest waits for speech to resume.
CLOSE_FRAMES = math.ceil(800 / FRAME_MS)
TAIL_FRAMES = 300 // FRAME_MS


class ScriptedVad:
    """Voiced iff the frame's first sample is odd (see :func:`script`)."""

    def __init__(self) -> None:
        self.calls = 0

    def is_speech(self, frame: bytes) -> bool:
        self.calls += 1
        return bool(frame[0] & 1)


def script(pattern: str, rate: int, first: int = 0) -> bytes:
    """One 30 ms frame per character ('1' voiced, '.' not); frame k holds 2k or 2k+1."""
    n = FRAME_MS * rate // 1000
    return b"".join(
        np.full(n, 2 * k + (c == "1"), dtype="<i2").tobytes()
        for k, c in enumerate(pattern, start=first)
    )


def frames_of(pcm: bytes, rate: int) -> list[int]:
    """Indices of the frames in scripted audio (must be whole frames)."""
    n = FRAME_MS * rate // 1000
    x = to_array(pcm)
    assert len(x) % n == 0
    return [int(v) // 2 for v in x[::n]]


def segmenter(rate: int = 16000, **kw: object) -> Segmenter:
    return Segmenter(SegmenterConfig(sample_rate=rate, **kw), ScriptedVad())  # type: ignore[arg-type]


@dataclass
class Utt:
    begin_ms: int
    audio_start_ms: int
    pcm: bytes
    end: UtteranceEnded | None
    # For each UtterancePaused: its speech_end_ms, and how much audio had been sent by then.
    # Advisory, and where a pause is reported depends on the chunking: not compared.
    pauses: list[tuple[int, int]] = field(default_factory=list, compare=False)


def utterances(events: list[SegmentEvent]) -> list[Utt]:
    """Group events per utterance, checking the order Started, (Audio | Paused)*, Ended, and
    that a pause is reported once: audio comes between two reports."""
    out: list[Utt] = []
    for e in events:
        if isinstance(e, UtteranceStarted):
            assert not out or out[-1].end is not None, "Started while one is open"
            out.append(Utt(e.begin_ms, e.audio_start_ms, b"", None))
        elif isinstance(e, UtteranceAudio):
            assert out and out[-1].end is None, "audio outside an utterance"
            assert e.pcm, "empty audio event"
            out[-1].pcm += e.pcm
        elif isinstance(e, UtterancePaused):
            assert out and out[-1].end is None, "Paused outside an utterance"
            pauses = out[-1].pauses
            assert not pauses or pauses[-1][1] < len(out[-1].pcm), "the same pause twice"
            pauses.append((e.speech_end_ms, len(out[-1].pcm)))
        else:
            assert out and out[-1].end is None, "Ended without Started"
            out[-1].end = e
    return out


def sent_end_ms(u: Utt, trailing_silence_ms: int = 300) -> int:
    """Where a closed utterance's audio ends: the pause after its last voiced frame goes out
    up to ``trailing_silence_ms``, the rest was held back and dropped with the close."""
    assert u.end is not None
    return min(u.end.end_ms, u.end.speech_end_ms + trailing_silence_ms)


def feed_all(seg: Segmenter, pcm: bytes, chunk: int | None = None) -> list[SegmentEvent]:
    if chunk is None:
        return seg.feed(pcm)
    events: list[SegmentEvent] = []
    for i in range(0, len(pcm), chunk):
        events += seg.feed(pcm[i : i + chunk])
    return events


# --- rules, with the scripted detector ------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000])
def test_one_sentence_exact_events(rate: int) -> None:
    pcm = script("." * 10 + "1" * 10 + "." * 30, rate)
    seg = segmenter(rate)
    events = seg.feed(pcm)
    # 6th voiced frame (frame 15) opens; onset = start of frame 10; pre-roll 300 ms -> 0.
    # Last voiced frame 19 ends at 600 ms; 27 unvoiced frames later (frame 46) it closes.
    # Of the pause, frames 20-29 (300 ms) go out; 30-46 are dropped with the close.
    assert len(events) == 3
    assert events[0] == UtteranceStarted(begin_ms=300, audio_start_ms=0)
    assert isinstance(events[1], UtteranceAudio)
    assert frames_of(events[1].pcm, rate) == list(range(20 + TAIL_FRAMES))
    assert events[2] == UtteranceEnded(
        end_ms=600 + CLOSE_FRAMES * FRAME_MS, speech_end_ms=600, timed_out=False
    )
    assert seg.processed_ms == 50 * FRAME_MS
    assert seg.flush() == []


@pytest.mark.parametrize("rate", [8000, 16000])
def test_preroll_is_clamped_and_taken_from_earlier_feeds(rate: int) -> None:
    seg = segmenter(rate, preroll_ms=150)
    # 40 unvoiced frames fed one by one: the ring buffer must still hold the pre-roll.
    quiet = script("." * 40, rate)
    fb = len(quiet) // 40
    events = feed_all(seg, quiet, fb)
    assert events == []
    events = seg.feed(script("1" * 6, rate, first=40))
    assert events[0] == UtteranceStarted(begin_ms=1200, audio_start_ms=1050)
    assert isinstance(events[1], UtteranceAudio)
    assert frames_of(events[1].pcm, rate) == list(range(35, 46))
    assert len(events) == 2


def test_begin_is_first_voiced_frame_of_window_and_stale_frames_expire() -> None:
    # Frame 0 is voiced but leaves the 10-frame window before the onset at frames 12..17.
    seg = segmenter()
    events = seg.feed(script("1" + "." * 11 + "1.1111" + "1" * 4, 16000))
    assert events[0] == UtteranceStarted(begin_ms=12 * FRAME_MS, audio_start_ms=2 * FRAME_MS)
    # 6 of the 7 frames 12..18 are voiced; the opening frame is 18.
    assert isinstance(events[1], UtteranceAudio)
    assert frames_of(events[1].pcm, 16000) == list(range(2, 22))


def test_scattered_voiced_frames_never_open() -> None:
    seg = segmenter()
    assert seg.feed(script("11...11..." * 20 + "1.1.1....." * 5, 16000)) == []
    assert seg.flush() == []


def test_silence_only_yields_nothing() -> None:
    seg = segmenter(8000)
    assert feed_all(seg, silence(10_000, 8000), 1601) == []
    assert seg.flush() == []
    assert seg.processed_ms == 10_000


def test_next_utterance_never_overlaps_the_previous() -> None:
    # Speech, close after 27 unvoiced frames, then speech again 2 frames later: the new
    # pre-roll would reach back into the previous utterance, so it is clamped at its end.
    pat = "1" * 8 + "." * CLOSE_FRAMES + ".." + "1" * 8 + "." * CLOSE_FRAMES
    seg = segmenter()
    u1, u2 = utterances(seg.feed(script(pat, 16000)))
    assert u1.end is not None and u2.end is not None
    assert u1.end.end_ms == (8 + CLOSE_FRAMES) * FRAME_MS
    assert u2.begin_ms == u1.end.end_ms + 2 * FRAME_MS
    assert u2.audio_start_ms == u1.end.end_ms
    # Each from its audio start to TAIL_FRAMES after its last voiced frame.
    assert frames_of(u1.pcm, 16000) == list(range(8 + TAIL_FRAMES))
    first = 8 + CLOSE_FRAMES
    assert frames_of(u2.pcm, 16000) == list(range(first, first + 10 + TAIL_FRAMES))


def test_events_are_coalesced_and_ordered_within_one_feed() -> None:
    pat = "1" * 8 + "." * CLOSE_FRAMES + "." * 20 + "1" * 8
    events = segmenter().feed(script(pat, 16000))
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "UtteranceStarted",
        "UtteranceAudio",
        "UtteranceEnded",
        "UtteranceStarted",
        "UtteranceAudio",
    ]


def test_audio_of_an_open_utterance_arrives_once_per_feed() -> None:
    seg = segmenter()
    seg.feed(script("1" * 6, 16000))
    events = seg.feed(script("1" * 5 + "." * 5, 16000, first=6))
    assert len(events) == 1 and isinstance(events[0], UtteranceAudio)
    assert frames_of(events[0].pcm, 16000) == list(range(6, 16))


@pytest.mark.parametrize("rate", [8000, 16000])
def test_max_sentence_force_close_and_restart(rate: int) -> None:
    seg = segmenter(rate, max_sentence_ms=1200)
    events = seg.feed(script("1" * 50, rate))
    u1, u2 = utterances(events)
    assert (u1.begin_ms, u1.audio_start_ms) == (0, 0)
    assert u1.end == UtteranceEnded(end_ms=1200, speech_end_ms=1200, timed_out=True)
    # Speech goes on: fresh onset evidence, the new utterance starts exactly where u1 ended.
    assert (u2.begin_ms, u2.audio_start_ms) == (1200, 1200)
    assert u2.end is None
    assert frames_of(u1.pcm + u2.pcm, rate) == list(range(50))
    # A sentence closed by silence is not a timeout.
    tail = seg.feed(script("." * CLOSE_FRAMES, rate, first=50))
    assert tail[-1] == UtteranceEnded(
        end_ms=(50 + CLOSE_FRAMES) * FRAME_MS, speech_end_ms=1500, timed_out=False
    )


def test_ignore_sentence_timeout() -> None:
    seg = segmenter(max_sentence_ms=900, ignore_sentence_timeout=True)
    events = seg.feed(script("1" * 200, 16000))
    assert [type(e) for e in events] == [UtteranceStarted, UtteranceAudio]
    events = seg.flush()
    assert events == [UtteranceEnded(end_ms=6000, speech_end_ms=6000, timed_out=False)]


@pytest.mark.parametrize("rate", [8000, 16000])
def test_flush_closes_open_utterance_with_partial_frame(rate: int) -> None:
    seg = segmenter(rate)
    pcm = script("1" * 8 + "." * 3, rate)
    partial = script("1", rate, first=11)[: 2 * (rate // 1000) * 10 + 1]  # 10 ms + odd byte
    seg.feed(pcm)
    assert seg.feed(partial) == []  # less than a frame: nothing processed yet
    assert seg.processed_ms == 11 * FRAME_MS
    events = seg.flush()
    assert events == [
        UtteranceAudio(partial[:-1]),
        UtteranceEnded(end_ms=11 * FRAME_MS + 10, speech_end_ms=8 * FRAME_MS, timed_out=False),
    ]
    assert seg.processed_ms == 11 * FRAME_MS + 10
    assert seg.flush() == []


def test_flush_during_a_held_pause_drops_it_and_the_partial_frame() -> None:
    seg = segmenter()
    seg.feed(script("1" * 8 + "." * (TAIL_FRAMES + 5), 16000))
    partial = script(".", 16000, first=8 + TAIL_FRAMES + 5)[:320]
    assert seg.feed(partial) == []
    assert seg.flush() == [
        UtteranceEnded(
            end_ms=(8 + TAIL_FRAMES + 5) * FRAME_MS + 10,
            speech_end_ms=8 * FRAME_MS,
            timed_out=False,
        )
    ]


@pytest.mark.parametrize("tail_frames", [0, 4, TAIL_FRAMES])
def test_a_pause_beyond_the_tail_waits_for_speech_then_goes_out_whole(tail_frames: int) -> None:
    # A pause of 20 frames (600 ms, shorter than the closing 800 ms) within the utterance.
    seg = segmenter(trailing_silence_ms=tail_frames * FRAME_MS)
    pat = "1" * 8 + "." * 20 + "1" * 8 + "." * CLOSE_FRAMES
    fed: list[list[SegmentEvent]] = [seg.feed(script(c, 16000, first=k)) for k, c in enumerate(pat)]
    # During the pause: each frame within the tail goes out as it comes, the others wait.
    for k in range(8, 28):
        sent = [frames_of(e.pcm, 16000) for e in fed[k] if isinstance(e, UtteranceAudio)]
        assert sent == ([[k]] if k < 8 + tail_frames else [])
    # The first voiced frame after it brings the held frames, in order, in one event.
    assert fed[28] == [
        UtteranceAudio(script("." * (20 - tail_frames) + "1", 16000, 8 + tail_frames))
    ]
    (u,) = utterances([e for events in fed for e in events])
    assert frames_of(u.pcm, 16000) == list(range(36 + tail_frames))
    assert u.end is not None and u.end.speech_end_ms == 36 * FRAME_MS


@pytest.mark.parametrize(
    ("tail_frames", "hint_frames"),
    [(0, 0), (4, 4), (TAIL_FRAMES, TAIL_FRAMES), (4, 10), (10, 20), (10, 0)],
)
def test_a_pause_is_reported_once_when_it_passes_pause_hint_ms(
    tail_frames: int, hint_frames: int
) -> None:
    seg = segmenter(
        trailing_silence_ms=tail_frames * FRAME_MS, pause_hint_ms=hint_frames * FRAME_MS
    )
    pat = "1" * 8 + "." * 25 + "1" * 8 + "." * CLOSE_FRAMES
    fed = [seg.feed(script(c, 16000, first=k)) for k, c in enumerate(pat)]
    reported = [
        k for k, events in enumerate(fed) if any(isinstance(e, UtterancePaused) for e in events)
    ]
    # At the first frame beyond pause_hint_ms (never before the hold starts) of each pause:
    # the one within the sentence and the one that closes it, each once.
    hint = max(tail_frames, hint_frames)
    assert reported == [8 + hint, 41 + hint]
    (u,) = utterances([e for events in fed for e in events])
    frame_bytes = 2 * FRAME_MS * 16
    # By then all of the utterance has gone out, unless speech resumes.
    assert u.pauses == [
        (8 * FRAME_MS, (8 + tail_frames) * frame_bytes),
        (41 * FRAME_MS, len(u.pcm)),
    ]


def test_a_pause_that_resumes_and_pauses_again_in_one_feed_is_reported_again() -> None:
    seg = segmenter(pause_hint_ms=300)
    seg.feed(script("1" * 8 + "." * 15, 16000))  # held: the pause beyond 300 ms
    events = seg.feed(script("1" * 4 + "." * 12, 16000, first=23))
    assert [type(e) for e in events] == [UtteranceAudio, UtterancePaused]
    assert events[1] == UtterancePaused(speech_end_ms=27 * FRAME_MS)


def test_no_pause_is_reported_without_a_hold() -> None:
    # A tail as long as the closing silence holds nothing back: there is nothing to report.
    seg = segmenter(trailing_silence_ms=CLOSE_FRAMES * FRAME_MS)
    pat = "1" * 8 + "." * 20 + "1" * 8 + "." * CLOSE_FRAMES
    events = [e for k, c in enumerate(pat) for e in seg.feed(script(c, 16000, first=k))]
    assert not any(isinstance(e, UtterancePaused) for e in events)
    # Nor when the pause closes the sentence within the feed that passes the tail.
    seg = segmenter()
    events = seg.feed(script("1" * 8 + "." * CLOSE_FRAMES, 16000))
    assert [type(e) for e in events] == [UtteranceStarted, UtteranceAudio, UtteranceEnded]


def test_a_tail_as_long_as_the_closing_silence_sends_the_whole_pause() -> None:
    seg = segmenter(trailing_silence_ms=CLOSE_FRAMES * FRAME_MS)
    (u,) = utterances(seg.feed(script("1" * 8 + "." * CLOSE_FRAMES, 16000)))
    assert frames_of(u.pcm, 16000) == list(range(8 + CLOSE_FRAMES))


def test_flush_while_idle_drops_partial_and_keeps_time() -> None:
    seg = segmenter()
    seg.feed(script("111", 16000) + b"\x01\x00" * 5)
    assert seg.flush() == []
    assert seg.processed_ms == 90  # 5 samples are < 1 ms
    # The stream may go on; stale onset evidence from before the flush does not count.
    events = seg.feed(script("111", 16000))
    assert events == []


@pytest.mark.parametrize("after", ["..", "1" * 12])
def test_set_max_sentence_silence_mid_stream(after: str) -> None:
    seg = segmenter(max_sentence_silence_ms=800)
    seg.feed(script("1" * 10 + "." * 10, 16000))  # 300 ms of silence so far
    # Already exceeded: the pause ends the sentence where the audio processed so far ends,
    # before the next frame, whether that frame is silent or speech resumes with it.
    seg.set_max_sentence_silence(200)
    events = seg.feed(script(after, 16000, first=20))
    assert events[0] == UtteranceEnded(end_ms=20 * FRAME_MS, speech_end_ms=300, timed_out=False)
    utts = utterances(events[1:])
    if after == "..":
        assert utts == []
    else:  # the speech that resumed is the next sentence, from its first frame
        assert [(u.begin_ms, u.audio_start_ms) for u in utts] == [(20 * FRAME_MS,) * 2]
        assert frames_of(utts[0].pcm, 16000) == list(range(20, 32))

    # Lengthening it keeps a sentence open past the old limit.
    seg = segmenter(max_sentence_silence_ms=800)
    seg.feed(script("1" * 10 + "." * 10, 16000))
    seg.set_max_sentence_silence(2000)
    events = seg.feed(script("." * 40, 16000, first=20))
    assert not any(isinstance(e, UtteranceEnded) for e in events)
    events = seg.feed(script("." * 27, 16000, first=60))
    assert events[-1] == UtteranceEnded(
        end_ms=300 + 67 * FRAME_MS, speech_end_ms=300, timed_out=False
    )


@pytest.mark.parametrize("ms", [199, 6001, 0])
def test_set_max_sentence_silence_rejects_out_of_range(ms: int) -> None:
    with pytest.raises(ValueError):
        segmenter().set_max_sentence_silence(ms)


@pytest.mark.parametrize(
    "kw",
    [
        {"sample_rate": 44100},
        {"sample_rate": 16000, "frame_ms": 25},
        {"sample_rate": 16000, "max_sentence_silence_ms": 100},
        {"sample_rate": 16000, "speech_noise_threshold": 1.5},
        {"sample_rate": 16000, "onset_ratio": 0.0},
        {"sample_rate": 16000, "preroll_ms": -1},
        {"sample_rate": 16000, "max_sentence_ms": 10},
    ],
)
def test_config_validation(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SegmenterConfig(**kw)  # type: ignore[arg-type]


def test_detector_sees_every_frame_exactly_once() -> None:
    vad = ScriptedVad()
    seg = Segmenter(SegmenterConfig(sample_rate=16000), vad)
    feed_all(seg, script("1" * 20 + "." * 50, 16000), 333)
    assert vad.calls == 70


@st.composite
def patterns(draw: st.DrawFn) -> str:
    runs = draw(
        st.lists(st.tuples(st.sampled_from(".1"), st.integers(1, 40)), min_size=1, max_size=12)
    )
    return "".join(c * n for c, n in runs)


@settings(max_examples=150, deadline=None)
@given(
    pat=patterns(),
    rate=st.sampled_from([8000, 16000]),
    cuts=st.lists(st.integers(1, 5000), min_size=1, max_size=30),
    tail=st.integers(0, 7),
    max_sentence_ms=st.sampled_from([600, 1500, 60_000]),
)
def test_any_chunking_gives_the_same_utterances(
    pat: str, rate: int, cuts: list[int], tail: int, max_sentence_ms: int
) -> None:
    pcm = script(pat, rate) + b"\x01" * tail
    whole = segmenter(rate, max_sentence_ms=max_sentence_ms)
    expected_events = whole.feed(pcm) + whole.flush()
    expected = utterances(expected_events)

    seg = segmenter(rate, max_sentence_ms=max_sentence_ms)
    events: list[SegmentEvent] = []
    i = 0
    k = 0
    while i < len(pcm):
        step = cuts[k % len(cuts)]
        chunk_events = seg.feed(pcm[i : i + step])
        # At most one audio event per utterance segment within a feed.
        kinds = [type(e) for e in chunk_events]
        assert all(
            not (a is UtteranceAudio and b is UtteranceAudio) for a, b in itertools.pairwise(kinds)
        )
        events += chunk_events
        i += step
        k += 1
    events += seg.flush()
    assert utterances(events) == expected
    assert seg.processed_ms == whole.processed_ms

    # Invariants: audio is exactly [audio_start, sent_end), utterances are disjoint and
    # ordered.
    bps = 2 * rate // 1000
    prev_end = 0
    for u in expected:
        assert u.end is not None
        assert prev_end <= u.audio_start_ms <= u.begin_ms < u.end.speech_end_ms <= u.end.end_ms
        assert len(u.pcm) // bps == sent_end_ms(u) - u.audio_start_ms
        assert u.pcm == pcm[u.audio_start_ms * bps : u.audio_start_ms * bps + len(u.pcm)]
        if u.end.timed_out:
            assert u.end.end_ms - u.begin_ms >= max_sentence_ms
        prev_end = u.end.end_ms


# --- real speech, real webrtcvad ------------------------------------------------------------

# Onset must be within this of where the clip's energy first reaches -35 dBFS. Measured
# (both rates): 10-80 ms early, because the onset frame catches the rising edge of the word.
BEGIN_TOLERANCE_MS = 250
CLIPS = ["0870", "0880", "0890", "0920", "0930"]


def real_segment(
    pcm: bytes, rate: int, chunk: int = 3200, **kw: object
) -> tuple[list[Utt], list[SegmentEvent]]:
    seg = Segmenter(SegmenterConfig(sample_rate=rate, **kw))  # type: ignore[arg-type]
    events = feed_all(seg, pcm, chunk) + seg.flush()
    return utterances(events), events


def recording(rate: int) -> tuple[bytes, list[tuple[int, int]], list[tuple[int, int]]]:
    """The five clips between digital silence and -50/-55 dBFS noise.

    Returns the PCM, each clip's span and each clip's speech span (energy scan) in the stream.
    """
    fillers = [
        silence(1000, rate),
        noise(2000, rate, -50, seed=1),
        silence(1500, rate),
        noise(1200, rate, -50, seed=2),
        noise(2500, rate, -55, seed=3),
    ]
    parts: list[bytes | Clip] = []
    for filler, name in zip(fillers, CLIPS, strict=True):
        parts += [filler, Clip(load_clip(name, rate), name)]
    parts.append(silence(1500, rate))
    pcm, spans = assemble(parts, rate)
    speech = []
    for (start, _), name in zip(spans, CLIPS, strict=True):
        s0, s1 = speech_bounds(load_clip(name, rate), rate)
        speech.append((start + s0, start + s1))
    return pcm, spans, speech


@pytest.mark.parametrize("rate", [16000, 8000])
def test_real_speech_one_utterance_per_clip(rate: int) -> None:
    pcm, spans, speech = recording(rate)
    utts, _ = real_segment(pcm, rate)
    assert len(utts) == len(CLIPS)
    bps = 2 * rate // 1000
    close_ms = math.ceil(800 / FRAME_MS) * FRAME_MS
    for u, (_, clip_end), (sp_start, sp_end) in zip(utts, spans, speech, strict=True):
        assert u.end is not None and not u.end.timed_out
        assert abs(u.begin_ms - sp_start) <= BEGIN_TOLERANCE_MS
        assert u.audio_start_ms == u.begin_ms - 300
        # The last voiced frame is after the loud part (word tails and -42 dBFS room tone pass
        # the -47 dBFS gate) but within the clip: the noise after it never counts as speech.
        assert sp_end - 150 <= u.end.speech_end_ms <= clip_end + FRAME_MS
        assert u.end.end_ms == u.end.speech_end_ms + close_ms
        assert u.pcm == pcm[u.audio_start_ms * bps : (u.end.speech_end_ms + 300) * bps]
        # The closing pause was reported once its hold started, with all of the audio sent.
        assert u.pauses[-1] == (u.end.speech_end_ms, len(u.pcm))


@pytest.mark.parametrize("rate", [16000, 8000])
def test_real_speech_chunking_does_not_matter(rate: int) -> None:
    pcm, _, _ = recording(rate)
    a, _ = real_segment(pcm[: len(pcm) // 2], rate, chunk=3200)
    b, _ = real_segment(pcm[: len(pcm) // 2], rate, chunk=777)
    c, _ = real_segment(pcm[: len(pcm) // 2], rate, chunk=len(pcm))
    assert a == b == c


@pytest.mark.parametrize("rate", [16000, 8000])
def test_clips_closer_than_max_sentence_silence_merge(rate: int) -> None:
    a, b = load_clip("0880", rate), load_clip("0930", rate)
    pcm, spans = assemble([silence(500, rate), Clip(a), silence(200, rate), Clip(b)], rate)
    utts, _ = real_segment(pcm + silence(1500, rate), rate)
    assert len(utts) == 1
    # The same clips 1.5 s apart are two sentences; with a 2 s limit they are one again.
    pcm, spans = assemble([silence(500, rate), Clip(a), silence(1500, rate), Clip(b)], rate)
    assert len(real_segment(pcm + silence(1500, rate), rate)[0]) == 2
    merged, _ = real_segment(pcm + silence(2500, rate), rate, max_sentence_silence_ms=2000)
    assert len(merged) == 1
    assert merged[0].end is not None
    assert merged[0].end.speech_end_ms > spans[1][0]


@pytest.mark.parametrize("rate", [16000, 8000])
def test_real_vad_ignores_silence_and_quiet_noise(rate: int) -> None:
    pcm = silence(1000, rate) + noise(3000, rate, -50, seed=7) + silence(500, rate)
    pcm += noise(3000, rate, -60, seed=8)
    assert real_segment(pcm, rate)[0] == []


def test_threshold_moves_the_noise_boundary() -> None:
    # After speech, webrtcvad (modes 0-2) keeps calling -50 dBFS white noise speech; only the
    # -47 dBFS gate stops it. At threshold -1 the gate drops to -64 dBFS and the noise
    # stretches the sentence to its own end.
    clip = load_clip("0880")
    pcm, spans = assemble(
        [silence(500, 16000), Clip(clip), noise(3000, 16000, -50, seed=7), silence(1500, 16000)],
        16000,
    )
    clip_end = spans[0][1]
    (u,) = real_segment(pcm, 16000, speech_noise_threshold=0.0)[0]
    assert u.end is not None and u.end.speech_end_ms <= clip_end + FRAME_MS
    (u,) = real_segment(pcm, 16000, speech_noise_threshold=-1.0)[0]
    assert u.end is not None and u.end.speech_end_ms >= clip_end + 3000 - FRAME_MS


def attenuated(pcm: bytes, db: float) -> bytes:
    return (to_array(pcm) * 10 ** (-db / 20)).astype("<i2").tobytes()


def test_quiet_speech_opens_on_time_unless_threshold_is_high() -> None:
    # The clips' active speech level is about -23 dBFS; 18 dB down (about -41 dBFS) is a quiet
    # far-field talker and must still open on time. At threshold +1 (gate -30 dBFS) a clip
    # only 15 dB down is ignored entirely.
    clip = load_clip("0880")
    start = 500 + speech_bounds(clip, 16000)[0]
    for db in (0, 10, 18):
        pcm = silence(500, 16000) + attenuated(clip, db) + silence(1500, 16000)
        (u,) = real_segment(pcm, 16000)[0]
        assert abs(u.begin_ms - start) <= BEGIN_TOLERANCE_MS, db
    pcm = silence(500, 16000) + attenuated(clip, 15) + silence(1500, 16000)
    assert real_segment(pcm, 16000, speech_noise_threshold=1.0)[0] == []


def test_threshold_changed_mid_stream_applies_to_the_next_frames() -> None:
    """ControlTranscriber's speech_noise_threshold: the same quiet sentence twice, with the
    threshold raised to +1 between them, opens only the first time; lowered back, it opens."""
    quiet = attenuated(load_clip("0880"), 15)
    seg = Segmenter(SegmenterConfig(sample_rate=16000))
    events = feed_all(seg, silence(500, 16000) + quiet + silence(1500, 16000), 3200)
    assert len(utterances(events)) == 1
    seg.set_speech_noise_threshold(1.0)
    assert feed_all(seg, quiet + silence(1500, 16000), 3200) == []
    seg.set_speech_noise_threshold(0.0)
    events = feed_all(seg, quiet + silence(1500, 16000), 3200) + seg.flush()
    assert len(utterances(events)) == 1


def test_threshold_mapping() -> None:
    assert [webrtc_mode(t) for t in (None, -1.0, -0.6, -0.5, -0.1, 0.0, 0.49, 0.5, 1.0)] == [
        2,
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    assert energy_gate_dbfs(None) == energy_gate_dbfs(0.0) == -47.0
    assert energy_gate_dbfs(-1.0) == -64.0
    assert energy_gate_dbfs(1.0) == -30.0
    with pytest.raises(ValueError):
        webrtc_mode(-1.01)


@pytest.mark.parametrize("rate", [8000, 16000])
def test_webrtc_batch_and_single_frame_agree(rate: int) -> None:
    pcm = noise(500, rate, -50, seed=3) + load_clip("0880", rate) + noise(300, rate, -40, seed=4)
    fb = 2 * FRAME_MS * rate // 1000
    pcm = pcm[: len(pcm) // fb * fb]
    one, batch = WebrtcVad(rate), WebrtcVad(rate)
    singles = [one.is_speech(pcm[i : i + fb]) for i in range(0, len(pcm), fb)]
    batched: list[bool] = []
    for i in range(0, len(pcm), 5 * fb):
        batched += batch.classify(pcm[i : i + 5 * fb], fb)
    assert singles == batched
    assert any(singles) and not all(singles)
