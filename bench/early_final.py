"""What the batch final pass run at a pause (``[worker] early_final``) costs in CPU.

A pause that passes ``[segmentation] pause_hint_ms`` (500 ms; ``--pause-hint-ms``) makes the
worker run the sentence's batch pass at once. If the pause closes the sentence (810 ms),
that pass is the final result and costs nothing extra. If speech resumes before, the pass
is thrown away: the price of the earlier ``SentenceEnd``. The bench recordings have no such
pauses inside them, so this script makes some: one session of each recording followed by
the next after ``--gap-ms`` of silence, as one sentence with a pause inside it (the
recordings' own silence at their ends adds to the gap), then 1.5 s of silence to close it.

Each stream is segmented as the gateway does it (not timed) and fed to one pocketsphinx
recogniser as a worker feeds it (timed with ``time.process_time()``), with the early pass
and without it, and with the worker's budget for passes thrown away
(``asrd.worker.EARLY_WASTE_BUDGET``). The script prints the CPU per second of audio of each,
the share of the audio that passes thrown away decoded again, and checks that both give the
same final results.

    .venv/bin/python bench/early_final.py --gap-ms 0 300 --pause-hint-ms 300 500
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass

from asrd.bench.baseline import EventFeeder
from asrd.bench.corpus import default_data_dir, load_corpus
from asrd.engines import Hypothesis
from asrd.engines.pocketsphinx import PocketsphinxEngine
from asrd.segmentation import (
    Segmenter,
    SegmenterConfig,
    SegmentEvent,
    UtteranceEnded,
    UtterancePaused,
)

FRAME_MS = 100
PARTIAL_MS = 200


def _session(gap_ms: int, repeat: int, hint_ms: int) -> tuple[list[SegmentEvent], float]:
    """Segmenter events of one session: each recording, ``gap_ms`` of silence and the next
    recording, then 1.5 s of silence, for every recording, ``repeat`` times; and its
    audio seconds."""
    corpus = load_corpus(default_data_dir())
    rate = corpus.sample_rate
    clips = corpus.clips
    gap, close = bytes(2 * rate * gap_ms // 1000), bytes(2 * rate * 1500 // 1000)
    pcm = b"".join(
        clips[k].pcm + gap + clips[(k + 1) % len(clips)].pcm + close
        for _ in range(repeat)
        for k in range(len(clips))
    )
    segmenter = Segmenter(SegmenterConfig(sample_rate=rate, pause_hint_ms=hint_ms))
    frame = 2 * rate * FRAME_MS // 1000
    events = [ev for i in range(0, len(pcm), frame) for ev in segmenter.feed(pcm[i : i + frame])]
    return events + segmenter.flush(), len(pcm) / 2 / rate


@dataclass
class Decoded:
    cpu_s: float
    finals: list[Hypothesis]
    used: int  # final results that came from the pass run at the pause
    thrown_away: float  # audio decoded again by passes thrown away, as a share of the audio


def _decode(events: list[SegmentEvent], early: bool) -> Decoded:
    """One recogniser decoding the session as a worker does."""
    engine = PocketsphinxEngine(decoders=1, final_pass="batch", early_final=early)
    feeder = EventFeeder(engine.acquire(16000), 2 * 16000 * PARTIAL_MS // 1000)
    t = time.process_time()
    for ev in events:
        feeder.feed(ev)
    cpu = time.process_time() - t
    engine.release(feeder.rec)
    share = feeder.early.voided / feeder.early.audio if early else 0.0
    return Decoded(cpu, feeder.finals, feeder.early_used if early else 0, share)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gap-ms", type=int, nargs="+", default=[0, 300, 500])
    parser.add_argument(
        "--pause-hint-ms", type=int, nargs="+", default=[500], help="[segmentation] pause_hint_ms"
    )
    parser.add_argument("--repeat", type=int, default=2, help="the recordings, this many times")
    parser.add_argument("--rounds", type=int, default=2, help="alternated on/off rounds")
    args = parser.parse_args()
    print(
        "gap ms | hint ms | sentences | pauses | finals early | thrown away | early ms/s | "
        "at close ms/s | ratio | same"
    )
    for gap, hint in itertools.product(args.gap_ms, args.pause_hint_ms):
        events, seconds = _session(gap, args.repeat, hint)
        sentences = sum(isinstance(e, UtteranceEnded) for e in events)
        pauses = sum(isinstance(e, UtterancePaused) for e in events)
        on = off = 0.0
        same = True
        for _ in range(args.rounds):
            early, at_close = _decode(events, True), _decode(events, False)
            on, off = on + early.cpu_s, off + at_close.cpu_s
            same = same and early.finals == at_close.finals
        on_ms = 1000 * on / args.rounds / seconds
        off_ms = 1000 * off / args.rounds / seconds
        print(
            f"{gap:6d} | {hint:7d} | {sentences:9d} | {pauses:6d} | {early.used:12d} | "
            f"{early.thrown_away:11.0%} | {on_ms:10.1f} | {off_ms:13.1f} | "
            f"{on_ms / off_ms:5.2f} | {'yes' if same else 'NO'}"
        )


if __name__ == "__main__":
    main()
