"""How many of the bench's pocketsphinx sessions an ideal service could hold: the capacity
search's rule applied to a model, to tell the costs that set the limit from the rest.

A bench session feeds its engine only while speech (and the 300 ms of silence after it) goes
on, so the demand on the cores rises and falls with how many sessions speak at once: with 8
sessions of the bench's schedule, from 3 to all 8. The engine limit of ``asrd bench
--engine-baseline`` is an average over that. This model replays the bench's own schedule
(the ramp, the playlists, a partial every 200 ms while a session speaks) against ``--cores``
cores shared equally among the sessions with work waiting, each on at most one core, with:

* each session's engine work at the baseline's average cost per stream-second, times
  ``--engine-factor`` (what a run's workers cost against the engine: the JSON report's
  ``worker_cpu_vs_engine``);
* ``--overhead-ms`` of CPU per stream-second taken from the cores all the time (the gateway,
  nats-server and the load generator);
* a partial's lag: ``--base-lag-ms`` plus the work its session has waiting, over its share of
  the cores.

It prints the worst session's p95 partial lag for each N, and the largest N under
``--lag-limit-ms`` (what ``asrd bench --find-capacity`` calls held), as a share of the limit.
No recognition runs; a few seconds of CPU.

    .venv/bin/python bench/capacity_model.py --limit 10.8
    .venv/bin/python bench/capacity_model.py --limit 10.8 --engine-factor 1 1.25 --overhead-ms 0 20
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import numpy.typing as npt

from asrd.bench.corpus import Corpus, Playlist, default_data_dir, load_corpus

STEP_S = 0.01
PARTIAL_EVERY = 20  # steps: 200 ms
TRAILING_S = 0.3  # [segmentation] trailing_silence_ms: fed to the engine after speech


def schedule(
    corpus: Corpus, n: int, ramp_s: float, duration_s: float, gap_ms: int
) -> tuple[npt.NDArray[np.bool_], float, float]:
    """Which of ``n`` bench sessions feed their engine at each step; fed and stream seconds."""
    spans: list[list[tuple[float, float]]] = []
    fed = stream = 0.0
    for k in range(n):
        playlist = Playlist.build(
            corpus, first=k % len(corpus.clips), min_duration_s=duration_s, gap_ms=gap_ms
        )
        start = k * ramp_s / n if n > 1 else 0.0  # as asrd.bench.load.schedule
        session = [
            (start + item.start_ms / 1000, start + item.end_ms / 1000 + TRAILING_S)
            for item in playlist.items
        ]
        spans.append(session)
        fed += sum(b - a for a, b in session)
        stream += playlist.duration_s
    end = max(b for session in spans for _, b in session) + 5.0
    t = np.arange(0.0, end, STEP_S)
    active = np.zeros((n, len(t)), dtype=bool)
    for k, session in enumerate(spans):
        for a, b in session:
            active[k, (t >= a) & (t < b)] = True
    return active, fed, stream


def worst_p95_lag_s(
    active: npt.NDArray[np.bool_],
    cost_per_fed_s: float,
    cores: float,
    base_lag_s: float,
) -> float:
    n, steps = active.shape
    waiting = np.zeros(n)  # CPU seconds of engine work per session
    lags: list[list[float]] = [[] for _ in range(n)]
    for i in range(steps):
        waiting += active[:, i] * cost_per_fed_s * STEP_S
        busy = waiting > 1e-12
        share = min(1.0, cores / max(1, int(busy.sum())))
        waiting[busy] = np.maximum(0.0, waiting[busy] - share * STEP_S)
        if i % PARTIAL_EVERY == 0:
            for k in np.flatnonzero(active[:, i]):
                lags[k].append(base_lag_s + waiting[k] / share)
    return max(float(np.percentile(x, 95)) for x in lags if x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=float, required=True, help="engine limit, streams")
    parser.add_argument("--cores", type=float, default=float(os.cpu_count() or 1))
    parser.add_argument("--engine-factor", type=float, nargs="+", default=[1.0, 1.1, 1.25])
    parser.add_argument("--overhead-ms", type=float, nargs="+", default=[0.0, 20.0])
    parser.add_argument("--base-lag-ms", type=float, default=50.0)
    parser.add_argument("--lag-limit-ms", type=float, default=300.0)
    parser.add_argument("--ramp", type=float, default=6.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--gap-ms", type=int, default=1500)
    parser.add_argument("--data", default=str(default_data_dir()))
    args = parser.parse_args()
    corpus = load_corpus(args.data)
    engine_per_stream_s = args.cores / args.limit
    counts = range(max(1, int(args.limit * 0.5)), int(args.limit * 1.05) + 1)
    schedules = {n: schedule(corpus, n, args.ramp, args.duration, args.gap_ms) for n in counts}
    print("| engine factor | overhead ms/s | " + " | ".join(f"{n}" for n in counts) + " | held |")
    print("|---:|---:|" + "---:|" * len(counts) + "---|")
    for factor in args.engine_factor:
        for overhead in args.overhead_ms:
            lags = []
            for n in counts:
                active, fed, stream = schedules[n]
                cost = factor * engine_per_stream_s * stream / fed
                cores = args.cores - n * overhead / 1000
                lag = worst_p95_lag_s(active, cost, cores, args.base_lag_ms / 1000)
                lags.append(1000 * lag)
            held = 0
            for n, lag in zip(counts, lags, strict=True):
                if lag >= args.lag_limit_ms:
                    break
                held = n
            cells = [f"{lag:.0f}" for lag in lags]
            print(
                f"| {factor:g} | {overhead:g} | "
                + " | ".join(cells)
                + f" | {held} ({held / args.limit:.0%}) |"
            )
    print(
        f"\nworst session's p95 partial lag (ms) for N streams; held: the largest N whose "
        f"lag and every smaller N's stay below {args.lag_limit_ms:g} ms, as a share of the "
        f"limit {args.limit:g}"
    )


if __name__ == "__main__":
    main()
