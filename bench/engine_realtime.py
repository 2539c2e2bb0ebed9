"""pocketsphinx alone, fed the way the service feeds it: what one stream costs under load.

``asrd bench --engine-baseline`` decodes the bench workload back to back in one process: one
decoder, hot in the CPU's caches. A worker of the service decodes 100 ms of audio every
100 ms, with many other decoders running in between. This script measures the engine's own
CPU per stream-second in between those two, with no gateway, NATS or worker code:

* ``--streams N`` streams, each with its own decoder, each decoding the bench workload
  (the same playlists, segmenter and engine class as the baseline);
* ``--processes P`` spreads them over P processes (by default one per stream); a process
  with several takes their frames in turn, as a worker with several decoders does;
* ``--pace realtime`` sleeps until each 100 ms frame would have arrived; ``--pace batch``
  decodes back to back;
* ``--load per-process`` builds the engine in each process (what ``asrd worker`` does now);
  ``--load shared`` builds it once and forks, so the processes share the model's memory
  pages (copy-on-write) and with them the CPU's caches;
* ``--pin`` keeps process k on CPU k mod cores, so that no decoder's state moves between the
  cores' caches;
* ``--gate S`` lets at most S processes decode at once (asrd.cpugate, as the service's forked
  workers do);
* ``--wake-ms M`` (real time) wakes every M ms and decodes all the audio that has arrived in
  one hold of the gate: fewer, longer turns per decoder, at the price of partials M ms apart.

Each process reports ``time.process_time()`` over its decoding; the script prints CPU per
stream-second, the figure the service's workers are compared with (docs/benchmarks.md).

    .venv/bin/python bench/engine_realtime.py --streams 9 --pace realtime --duration 60
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import time
from typing import Any

from asrd.bench.baseline import EventFeeder
from asrd.bench.corpus import Playlist, default_data_dir, load_corpus
from asrd.cpugate import CpuGate
from asrd.segmentation import Segmenter, SegmenterConfig

FRAME_MS = 100
PARTIAL_MS = 200


def _timed_events(first: int, duration_s: float) -> tuple[list[tuple[float, Any]], float]:
    """Segmenter events of one bench session's playlist, each with its arrival time."""
    corpus = load_corpus(default_data_dir())
    playlist = Playlist.build(
        corpus, first=first, min_duration_s=duration_s, gap_ms=1500, frame_ms=FRAME_MS
    )
    config = SegmenterConfig(sample_rate=corpus.sample_rate, max_sentence_silence_ms=800)
    segmenter = Segmenter(config)
    events: list[tuple[float, Any]] = []
    for k, frame in enumerate(playlist.frames, 1):
        events += [(k * FRAME_MS / 1000, ev) for ev in segmenter.feed(frame)]
    events += [(len(playlist.frames) * FRAME_MS / 1000, ev) for ev in segmenter.flush()]
    return events, playlist.duration_s


def _decode(
    engine: Any,
    indices: list[int],
    args: argparse.Namespace,
    start_at: float,
    out: Any,
    gate: CpuGate | None = None,
) -> None:
    """The streams of one process, their frames interleaved by arrival time, as a worker with
    several decoders takes its sessions' messages in turn."""
    timed = [_timed_events(i, args.duration) for i in indices]
    merged = sorted(
        (at, k, n, ev) for k, (events, _) in enumerate(timed) for n, (at, ev) in enumerate(events)
    )
    step = 2 * 16000 * PARTIAL_MS // 1000
    feeders = [EventFeeder(engine.acquire(16000, partials=True), step) for _ in indices]
    while time.time() < start_at:
        time.sleep(0.01)
    slot = gate if gate is not None else contextlib.nullcontext()  # as asrd.worker holds it
    t0 = time.monotonic()
    cpu0 = time.process_time()
    wake = args.wake_ms / 1000
    i = 0
    while i < len(merged):
        at = merged[i][0]
        if args.pace == "realtime":
            due = -(-at // wake) * wake if wake else at
            delay = t0 + due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic() - t0
        else:
            now = at + wake
        j = i + 1  # without --wake-ms, one event per hold of the gate, as the worker
        while wake and j < len(merged) and merged[j][0] <= now + 1e-9:
            j += 1
        with slot:
            for _, k, _, ev in merged[i:j]:
                feeders[k].feed(ev)
        i = j
    cpu = time.process_time() - cpu0
    late = time.monotonic() - t0 - max(d for _, d in timed)
    for feeder in feeders:
        engine.release(feeder.rec)
    out.put((cpu, sum(d for _, d in timed), late))


def _child(
    indices: list[int],
    args: argparse.Namespace,
    engine: Any,
    start_at: float,
    out: Any,
    gate: CpuGate | None = None,
) -> None:
    if gate is not None:
        gate.bind(indices[0])  # process p decodes streams p, p + P, ...
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[indices[0] % len(cpus)]})
    if engine is None:
        from asrd.engines.pocketsphinx import PocketsphinxEngine

        engine = PocketsphinxEngine(decoders=len(indices), final_pass=args.final_pass)
    _decode(engine, indices, args, start_at, out, gate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=9)
    parser.add_argument(
        "--processes", type=int, default=0, help="spread the streams over this many (0: one each)"
    )
    parser.add_argument("--pace", choices=("realtime", "batch"), default="realtime")
    parser.add_argument("--load", choices=("per-process", "shared"), default="per-process")
    parser.add_argument("--final-pass", choices=("live", "batch", "adaptive"), default="live")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--pin", action="store_true", help="pin process k to CPU k mod cores")
    parser.add_argument(
        "--gate", type=int, default=0, help="at most this many processes decode at once (0: any)"
    )
    parser.add_argument(
        "--wake-ms", type=float, default=0, help="decode what has arrived every this many ms"
    )
    args = parser.parse_args()

    ctx = multiprocessing.get_context("fork")
    nproc = args.processes or args.streams
    groups = [list(range(p, args.streams, nproc)) for p in range(nproc)]
    shared = None
    if args.load == "shared":
        from asrd.engines.pocketsphinx import PocketsphinxEngine

        shared = PocketsphinxEngine(
            decoders=max(len(g) for g in groups), final_pass=args.final_pass
        )
    out = ctx.Queue()
    gate = CpuGate(args.gate, nproc) if args.gate else None
    start_at = time.time() + 5.0 + 0.4 * args.streams  # every decoder loaded first
    procs = [
        ctx.Process(target=_child, args=(group, args, shared, start_at, out, gate))
        for group in groups
    ]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    cpu = sum(r[0] for r in results)
    stream_s = sum(r[1] for r in results)
    worst_late = max(r[2] for r in results)
    print(
        f"streams={args.streams} processes={nproc} pace={args.pace} load={args.load} "
        f"final_pass={args.final_pass} pin={args.pin} gate={args.gate} wake={args.wake_ms:g} "
        f"cores={os.cpu_count()}: {1000 * cpu / stream_s:.1f} ms CPU per stream-second "
        f"({stream_s:.0f} stream-s), worst stream finished {worst_late:+.2f} s after its audio"
    )


if __name__ == "__main__":
    main()
