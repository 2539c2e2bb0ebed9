"""Prometheus metrics without a dependency: counters, gauges and histograms, text exposition.

Updates are plain attribute arithmetic on the event loop's thread (no locks), cheap enough for
the per-frame path. One :class:`Registry` per process.
"""

from __future__ import annotations

import bisect
import gc
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from asrd import procfs

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Counter:
    def __init__(self, name: str, help_: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help_, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, *label_values: str) -> None:
        self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield from _family(self.name, "counter", self.help)
        if not self.values and not self.labels:
            yield f"{self.name} 0"
        for lv, v in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.labels, lv)} {_num(v)}"


class Gauge:
    """A value read when scraped (``fn``) or set by the owner. ``kind="counter"`` for a total
    kept elsewhere (a client library's reconnect count) and only read here."""

    def __init__(
        self,
        name: str,
        help_: str,
        fn: Callable[[], float] | None = None,
        *,
        kind: str = "gauge",
    ) -> None:
        self.name, self.help, self.fn, self.kind = name, help_, fn, kind
        self.value = 0.0

    def render(self) -> Iterable[str]:
        yield from _family(self.name, self.kind, self.help)
        yield f"{self.name} {_num(self.fn() if self.fn else self.value)}"


class Histogram:
    def __init__(self, name: str, help_: str, buckets: Sequence[float] = LATENCY_BUCKETS_S):
        self.name, self.help = name, help_
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> Iterable[str]:
        yield from _family(self.name, "histogram", self.help)
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            cumulative += n
            yield f'{self.name}_bucket{{le="{bound:g}"}} {cumulative}'
        yield f'{self.name}_bucket{{le="+Inf"}} {self.count}'
        yield f"{self.name}_sum {_num(self.sum)}"
        yield f"{self.name}_count {self.count}"


class ProcessMetrics:
    """This process's CPU, memory, file descriptors and garbage collections, read when scraped.

    The names and meanings are those of the official Prometheus client for Python
    (``process_*``, ``python_gc_*``), so stock dashboards and alerts work unchanged: a slow
    leak shows in ``process_resident_memory_bytes`` long before the out-of-memory killer does.
    """

    def render(self) -> Iterable[str]:
        pid = os.getpid()
        s = procfs.read_proc(pid)
        if s is not None:  # else no /proc: not Linux
            started = procfs.boot_time() + s.started_s
            for name, kind, help_, value in (
                ("process_cpu_seconds_total", "counter", "user and system CPU, s", s.cpu_s),
                ("process_resident_memory_bytes", "gauge", "resident memory", s.rss_kb * 1024),
                ("process_virtual_memory_bytes", "gauge", "virtual memory", s.vm_kb * 1024),
                ("process_start_time_seconds", "gauge", "start, s since the epoch", started),
                ("process_open_fds", "gauge", "open file descriptors", procfs.open_fds(pid)),
                ("process_max_fds", "gauge", "most file descriptors it may open", procfs.max_fds()),
            ):
                yield from _family(name, kind, help_)
                yield f"{name} {value:.15g}"
        stats = gc.get_stats()
        for key, name, help_ in (
            ("collections", "python_gc_collections_total", "collections by generation"),
            ("collected", "python_gc_objects_collected_total", "objects collected"),
            ("uncollectable", "python_gc_objects_uncollectable_total", "uncollectable objects"),
        ):
            yield from _family(name, "counter", help_)
            for generation, stat in enumerate(stats):
                yield f'{name}{{generation="{generation}"}} {stat[key]}'


def _family(name: str, kind: str, help_: str) -> tuple[str, str]:
    """The HELP and TYPE lines that head a metric family."""
    return f"# HELP {name} {help_}", f"# TYPE {name} {kind}"


Metric = Counter | Gauge | Histogram | ProcessMetrics
M = TypeVar("M", Counter, Gauge, Histogram)


class Registry:
    """The metrics of one process; each starts with the ``process_*`` ones."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = [ProcessMetrics()]

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def render(self) -> bytes:
        lines: list[str] = []
        for m in self.metrics:
            lines.extend(m.render())
        return ("\n".join(lines) + "\n").encode()


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escaped(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(x: float) -> str:
    """Twelve significant digits: ``:g`` keeps six, and a total past 1e6 would move in steps;
    more would show the rounding noise of a float sum (13.1499999999998 for 13.15)."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 2**53 else format(x, ".12g")


class GatewayMetrics:
    """What a gateway exports on /metrics."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.active = r.add(Gauge("asrd_sessions_active", "sessions running now"))
        self.sessions = r.add(
            Counter("asrd_sessions_total", "ended sessions by status code", ["code"])
        )
        self.audio = r.add(Counter("asrd_audio_seconds_total", "audio received, seconds"))
        self.partial_lag = r.add(
            Histogram(
                "asrd_partial_lag_seconds",
                "result sent minus arrival of the audio it covers (intermediate results)",
            )
        )
        self.endpointing = r.add(
            Histogram(
                "asrd_endpointing_seconds",
                "SentenceEnd sent minus arrival of the audio (or the Stop) that closed the "
                "sentence",
            )
        )
        self.failovers = r.add(
            Counter(
                "asrd_failovers_total", "moves to a new worker, counted when their session ends"
            )
        )
        self.engine_waits = r.add(
            Counter(
                "asrd_engine_waits_total",
                "times a session stopped reading its client until its engine worker caught up",
            )
        )
        self.workers = r.add(Gauge("asrd_workers_alive", "engine workers heard from"))
        self.decoders_free = r.add(
            Gauge("asrd_decoders_free", "free decoders of live workers not draining")
        )
        self.decoders_total = r.add(Gauge("asrd_decoders_total", "decoders of live workers"))
        self.nats_reconnects = r.add(
            Gauge("asrd_nats_reconnects_total", "NATS reconnections", kind="counter")
        )
        self.nats_errors = r.add(Gauge("asrd_nats_errors_total", "NATS errors", kind="counter"))
        self.redis_errors, self.redis_reconnects = _redis_gauges(r)


class WorkerMetrics:
    """What an engine worker exports on /metrics."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.sessions = r.add(Gauge("asrd_worker_sessions", "sessions decoded now"))
        self.decoders_free = r.add(Gauge("asrd_worker_decoders_free", "free decoders"))
        self.decoders_total = r.add(Gauge("asrd_worker_decoders_total", "decoders"))
        self.claims = r.add(Counter("asrd_worker_claims_total", "claims by outcome", ["outcome"]))
        self.utterances = r.add(Counter("asrd_worker_utterances_total", "final results sent"))
        self.early_finals = r.add(
            Counter(
                "asrd_worker_early_final_passes_total",
                "final passes run at a pause: used (the pause closed the sentence) or voided",
                ["outcome"],
            )
        )
        self.audio = r.add(Counter("asrd_worker_audio_seconds_total", "audio decoded, seconds"))
        self.errors = r.add(Counter("asrd_worker_session_errors_total", "sessions failed"))
        self.nats_reconnects = r.add(
            Gauge("asrd_nats_reconnects_total", "NATS reconnections", kind="counter")
        )
        self.nats_errors = r.add(Gauge("asrd_nats_errors_total", "NATS errors", kind="counter"))
        self.redis_errors, self.redis_reconnects = _redis_gauges(r)  # following the routing


def _redis_gauges(r: Registry) -> tuple[Gauge, Gauge]:
    """Failed Redis commands and recoveries; 0 for a process that uses no Redis."""
    return (
        r.add(Gauge("asrd_redis_errors_total", "failed Redis commands", kind="counter")),
        r.add(
            Gauge(
                "asrd_redis_reconnects_total",
                "Redis reachable again after an outage",
                kind="counter",
            )
        ),
    )
