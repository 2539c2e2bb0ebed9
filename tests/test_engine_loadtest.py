"""The load-test engine: the Engine/Recognizer contract, deterministic placeholder text."""

from __future__ import annotations

import itertools

import pytest

from asrd.engines import EngineFull, Hypothesis, create_engine
from asrd.engines.loadtest import (
    BLOCK_MS,
    CONFIDENCE,
    FIRST_WORD,
    WORD_MS,
    LoadtestEngine,
    LoadtestRecognizer,
    placeholder_words,
)
from asrd.errors import TooManyRequests, UnsupportedSampleRate
from tests.audio_fixtures import LIBRIVOX, load_clip, silence

RATE = 16000
CLIP = load_clip(sorted(LIBRIVOX)[1])  # a 3 s LibriVox recording


def recognise(rec: LoadtestRecognizer, pcm: bytes, chunk: int) -> tuple[Hypothesis, list[str]]:
    rec.start()
    partials = []
    for i in range(0, len(pcm), chunk):
        rec.accept(pcm[i : i + chunk])
        p = rec.partial()
        if p is not None:
            partials.append(p.text)
    return rec.finish(), partials


def test_registered_under_its_own_name_and_never_the_default() -> None:
    engine = create_engine("loadtest", decoders=3, final_pass="batch")  # worker options ignored
    assert isinstance(engine, LoadtestEngine)
    assert (engine.name, engine.capacity, engine.early_final) == ("loadtest", 3, False)
    assert (engine.acquire(16000).final_cost, engine.acquire(16000).early_final) == (0.0, False)
    from asrd.config import WorkerConfig

    assert WorkerConfig().engine == "pocketsphinx"


def test_pool_is_bounded_and_recognizers_come_back() -> None:
    engine = LoadtestEngine(decoders=2)
    a = engine.acquire(RATE)
    b = engine.acquire(8000, partials=False)
    assert engine.available == 0
    with pytest.raises(EngineFull) as err:
        engine.acquire(RATE)
    assert isinstance(err.value, TooManyRequests)
    engine.release(a)
    assert engine.available == 1
    with pytest.raises(ValueError):
        engine.release(a)  # twice
    with pytest.raises(ValueError):
        LoadtestEngine(decoders=1).release(b)  # not lent by that engine
    with pytest.raises(RuntimeError):
        a.start()  # used after release
    engine.release(b)
    assert engine.available == 2


def test_rejects_bad_rates_and_decoder_counts() -> None:
    engine = LoadtestEngine(decoders=1)
    with pytest.raises(UnsupportedSampleRate):
        engine.acquire(4000)
    with pytest.raises(UnsupportedSampleRate):
        engine.acquire(96000)
    with pytest.raises(ValueError):
        LoadtestEngine(decoders=0)


def test_protocol_misuse_is_an_error() -> None:
    rec = LoadtestEngine(decoders=1).acquire(RATE)
    with pytest.raises(RuntimeError):
        rec.accept(b"\0\0")
    with pytest.raises(RuntimeError):
        rec.finish()
    rec.start()
    with pytest.raises(RuntimeError):
        rec.start()


def test_speech_gets_one_placeholder_word_per_300_ms_of_sound() -> None:
    rec = LoadtestEngine(decoders=1).acquire(RATE)
    pcm = silence(500, RATE) + CLIP + silence(800, RATE)
    final, partials = recognise(rec, pcm, 3200)
    words = final.words
    assert words and final.text == " ".join(w.text for w in words)
    assert words[0].text == FIRST_WORD
    assert [w.text for w in words[1:]] == [f"word{k}" for k in range(1, len(words))]
    assert final.confidence == CONFIDENCE
    # The sound lies within the recording: silence around it only shifts the times.
    clip_ms = len(CLIP) // 2 * 1000 // RATE
    assert 500 <= words[0].start_ms and words[-1].end_ms <= 500 + clip_ms
    alone, _ = recognise(LoadtestEngine(decoders=1).acquire(RATE), CLIP, 3200)
    assert alone.text == final.text
    assert [(w.start_ms + 500, w.end_ms + 500) for w in alone.words] == [
        (w.start_ms, w.end_ms) for w in words
    ]
    assert 500 % BLOCK_MS == 0
    for a, b in itertools.pairwise(words):
        assert a.end_ms == b.start_ms == a.start_ms + WORD_MS
    assert len(words) == -(-(words[-1].end_ms - words[0].start_ms) // WORD_MS)
    # Partials: none before the first sound, then growing prefixes of the final text.
    assert partials and all(final.text.startswith(p) for p in partials)
    assert partials == sorted(partials, key=len)


def test_result_does_not_depend_on_chunking() -> None:
    pcm = silence(300, RATE) + CLIP + silence(900, RATE)
    results = set()
    for chunk in (3200, 640, 1001, 7, len(pcm)):
        rec = LoadtestEngine(decoders=1).acquire(RATE)
        final, _ = recognise(rec, pcm, chunk)
        results.add(final)
    assert len(results) == 1


def test_silence_is_no_speech_and_partials_can_be_off() -> None:
    engine = LoadtestEngine(decoders=2)
    rec = engine.acquire(RATE)
    final, partials = recognise(rec, silence(2000, RATE), 3200)
    assert final.text == "" and final.words == () and partials == []
    quiet = engine.acquire(RATE, partials=False)
    final, partials = recognise(quiet, CLIP, 3200)
    assert partials == [] and final.text.startswith(FIRST_WORD)


def test_recognizer_is_reusable_across_utterances_and_sessions() -> None:
    engine = LoadtestEngine(decoders=1)
    rec = engine.acquire(RATE)
    first, _ = recognise(rec, CLIP, 3200)
    second, _ = recognise(rec, CLIP, 3200)
    assert first == second
    engine.release(rec)
    again, _ = recognise(engine.acquire(RATE), CLIP, 3200)
    assert again == first


def test_placeholder_words() -> None:
    assert placeholder_words(100, 100) == ()
    words = placeholder_words(100, 750)
    assert [(w.text, w.start_ms, w.end_ms) for w in words] == [
        (FIRST_WORD, 100, 400),
        ("word1", 400, 700),
        ("word2", 700, 750),
    ]


@pytest.mark.parametrize("rate", [11025, 12345, 44100])
def test_words_end_within_the_audio_at_rates_whose_blocks_are_not_whole_ms(rate: int) -> None:
    """At 11025 Hz a block is 220 samples (19.95 ms): timed as 20 ms each, 10 s of sound
    ended its last word at 10022 ms, after the audio."""
    rec = LoadtestEngine(decoders=1).acquire(rate)
    loud = (1000).to_bytes(2, "little", signed=True) * (10 * rate + 7)
    final, _ = recognise(rec, loud, 3001)
    assert (final.words[0].start_ms, final.words[-1].end_ms) == (0, 10000)
