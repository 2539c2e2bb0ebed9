"""Where a sentence's final result comes from (``[worker] final_pass``): WER and engine CPU.

Each corpus is decoded as sessions, as a worker decodes them: one recogniser per session, its
recordings as consecutive utterances in 100 ms chunks with a partial every 200 ms. Each
recording is first in one session, the others follow in order. Printed per final pass: the
WER of the sessions' first sentences and of the later ones, and the engine's CPU
(``time.process_time()``) per second of audio. The first sentences are where the three differ
most: live CMN starts from the model's prior; ``batch`` and ``adaptive`` measure it.

    .venv/bin/python bench/final_pass.py
    .venv/bin/python bench/final_pass.py tests/data tests/data/cards
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from asrd.bench.corpus import Clip, default_data_dir, load_corpus
from asrd.engines.pocketsphinx import FINAL_PASSES, PocketsphinxEngine
from asrd.wer import wer


def session(engine: PocketsphinxEngine, clips: list[Clip], rate: int) -> tuple[list[str], float]:
    """The finals of one session of ``clips``, and the engine's CPU seconds for it."""
    rec = engine.acquire(rate)
    step = rate * 2 // 10
    texts = []
    t = time.process_time()
    try:
        for clip in clips:
            rec.start()
            for n, i in enumerate(range(0, len(clip.pcm), step)):
                rec.accept(clip.pcm[i : i + step])
                if n % 2:
                    rec.partial()
            texts.append(rec.finish().text)
    finally:
        engine.release(rec)
    return texts, time.process_time() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "corpora",
        nargs="*",
        type=Path,
        help="directories of WAV files and .transcription files (default: tests/data and "
        "tests/data/cards)",
    )
    args = parser.parse_args()
    data = default_data_dir()
    corpora = args.corpora or [data, data / "cards"]
    print("| recordings | final_pass | WER, first sentences | WER, later | CPU ms per audio-s |")
    print("|---|---|---:|---:|---:|")
    for folder in corpora:
        corpus = load_corpus(folder)
        clips = list(corpus.clips)
        for final_pass in FINAL_PASSES:
            engine = PocketsphinxEngine(decoders=1, final_pass=final_pass)
            refs: tuple[list[str], list[str]] = ([], [])
            hyps: tuple[list[str], list[str]] = ([], [])
            cpu = 0.0
            for first in range(len(clips)):
                order = clips[first:] + clips[:first]
                texts, spent = session(engine, order, corpus.sample_rate)
                cpu += spent
                for k, (clip, text) in enumerate(zip(order, texts, strict=True)):
                    refs[k > 0].append(clip.reference)
                    hyps[k > 0].append(text)
            ms = 1000 * cpu / (corpus.seconds * len(clips))
            print(
                f"| {os.path.relpath(folder)} | {final_pass} | {wer(refs[0], hyps[0]):.1%} "
                f"| {wer(refs[1], hyps[1]):.1%} | {ms:.0f} |"
            )


if __name__ == "__main__":
    main()
