"""Pure statistics of a benchmark run: percentiles, and stream time -> send time mapping.

No I/O and no clock: everything here is driven by numbers the load generator recorded, so it
is unit-tested synchronously.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "PERCENTILES",
    "FrameClock",
    "Summary",
    "by_window",
    "endpoint_latency_s",
    "percentile",
    "summarize",
]

PERCENTILES = (50, 90, 95, 99)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, linearly interpolated.

    The same definition as numpy's default (``method="linear"``): position ``q/100 * (n-1)``.
    Raises ValueError for an empty sequence or ``q`` outside 0..100.
    """
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = q / 100.0 * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


@dataclass(frozen=True, slots=True)
class Summary:
    """Count, mean, p50/p90/p95/p99 and max of a sample (all in the sample's unit)."""

    count: int
    avg: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float

    def scaled(self, factor: float) -> Summary:
        return Summary(
            self.count,
            self.avg * factor,
            self.p50 * factor,
            self.p90 * factor,
            self.p95 * factor,
            self.p99 * factor,
            self.max * factor,
        )

    def as_dict(self, digits: int = 1) -> dict[str, float | int]:
        return {
            "count": self.count,
            "avg": round(self.avg, digits),
            "p50": round(self.p50, digits),
            "p90": round(self.p90, digits),
            "p95": round(self.p95, digits),
            "p99": round(self.p99, digits),
            "max": round(self.max, digits),
        }


def summarize(values: Iterable[float]) -> Summary | None:
    """Summary of ``values``; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    p50, p90, p95, p99 = (percentile(ordered, q) for q in PERCENTILES)
    return Summary(len(ordered), math.fsum(ordered) / len(ordered), p50, p90, p95, p99, ordered[-1])


def by_window(
    points: Iterable[tuple[float, float]], start: float, width: float
) -> list[tuple[float, Summary]]:
    """Summaries of the values of ``(time, value)`` points in consecutive windows of
    ``width`` from ``start``: ``(window start - start, summary)`` for each window that has
    any, in time order. A point before ``start`` counts in the first window."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    windows: dict[int, list[float]] = {}
    for t, value in points:
        windows.setdefault(max(0, math.floor((t - start) / width)), []).append(value)
    out: list[tuple[float, Summary]] = []
    for k in sorted(windows):
        summary = summarize(windows[k])
        assert summary is not None
        out.append((k * width, summary))
    return out


class FrameClock:
    """When the audio up to a stream time had been sent, from per-frame send times.

    ``frame_samples`` are the sizes (in samples) of the frames in sending order. Frame ``k``
    holds samples ``[end[k-1], end[k])``. :meth:`sent` records the clock reading at which a
    frame was handed to the connection; :meth:`sent_at` maps a stream time in ms to the send
    time of the frame that holds the last sample before it, i.e. the moment all audio up to
    that time was out. Times before any audio map to the first frame, times past the end to
    the last one.
    """

    __slots__ = ("_ends", "_rate", "_times")

    def __init__(self, frame_samples: Sequence[int], sample_rate: int) -> None:
        if sample_rate <= 0:
            raise ValueError("sample_rate must be positive")
        ends: list[int] = []
        total = 0
        for n in frame_samples:
            if n <= 0:
                raise ValueError("frames must hold at least one sample")
            total += n
            ends.append(total)
        self._ends = ends
        self._rate = sample_rate
        self._times: list[float | None] = [None] * len(ends)

    @property
    def frames(self) -> int:
        return len(self._ends)

    def frame_end_s(self, k: int) -> float:
        """Stream time (s) of the end of frame ``k``: when it would be complete, live."""
        return self._ends[k] / self._rate

    def sent(self, k: int, t: float) -> None:
        self._times[k] = t

    def frame_of(self, stream_ms: float) -> int:
        """Index of the frame holding the sample just before ``stream_ms``."""
        if not self._ends:
            raise ValueError("no frames")
        sample = math.ceil(stream_ms * self._rate / 1000)
        return min(bisect_left(self._ends, sample), len(self._ends) - 1)

    def sent_at(self, stream_ms: float) -> float | None:
        """Send time of all audio up to ``stream_ms``; None if that frame was not sent."""
        return self._times[self.frame_of(stream_ms)]


def endpoint_latency_s(
    received: float, speech_end_sent: float, max_sentence_silence_ms: int, speed: float = 1.0
) -> float:
    """Endpointing latency: from the end of speech being sent, less the required silence.

    The server cannot end a sentence before ``max_sentence_silence`` of silence was heard
    after the speech; what is left is the server's own delay (VAD frame rounding, the
    engine's final pass, the bus and the socket). ``speed`` > 1 when audio was streamed
    faster than real time: the silence then took ``1/speed`` of its stream duration to send.
    """
    return received - speech_end_sent - max_sentence_silence_ms / 1000.0 / speed
