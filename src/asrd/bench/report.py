"""A benchmark run's report: figures from the raw session results, as JSON and as a table."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asrd.bench.load import LATE_S, SessionResult
from asrd.bench.procs import RoleUsage
from asrd.bench.stats import Summary, by_window, percentile, summarize
from asrd.wer import wer

__all__ = ["HoldCriteria", "build_report", "format_table", "machine_info", "report_text"]

_MB = 1024.0
LAG_WINDOW_S = 10.0  # partial lag is also summed up per this much of the run


@dataclass(frozen=True)
class HoldCriteria:
    """When a run "held real time": every session completed, and every session's p95
    partial lag stayed under ``lag_p95_limit_ms``."""

    lag_p95_limit_ms: float = 300.0


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
    }


def _ms(summary: Summary | None) -> dict[str, float | int] | None:
    return None if summary is None else summary.scaled(1000.0).as_dict(1)


def _session_p95s(results: Sequence[SessionResult]) -> list[float]:
    return [percentile(sorted(r.partial_lags), 95) for r in results if r.partial_lags]


def _lag_by_time(results: Sequence[SessionResult]) -> dict[str, Any] | None:
    """Partial lag per ``LAG_WINDOW_S`` of the run, from the first session's scheduled start:
    whether the late partials came as the sessions started, or all through the run."""
    if any(len(r.partial_received) != len(r.partial_lags) for r in results):
        return None  # results without the receive times (from before them)
    starts = [r.started_at for r in results if r.started_at is not None]
    points = [
        point for r in results for point in zip(r.partial_received, r.partial_lags, strict=True)
    ]
    if not starts or not points:
        return None
    return {
        "window_s": LAG_WINDOW_S,
        "windows": [
            {"from_s": t, **summary.scaled(1000.0).as_dict(1)}
            for t, summary in by_window(points, min(starts), LAG_WINDOW_S)
        ],
    }


def count(n: int, noun: str, nouns: str = "") -> str:
    """``n`` of ``noun``, in the singular for one, as the log lines count them (``nouns``:
    the plural, if not ``noun`` + "s")."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def build_report(
    results: Sequence[SessionResult],
    *,
    usage: dict[str, RoleUsage],
    machine_busy_s: float,
    machine_steal_s: float | None = None,
    client_cpu_s: float,
    client_processes: int,
    wall_s: float,
    run: dict[str, Any],
    criteria: HoldCriteria,
) -> dict[str, Any]:
    completed = [r for r in results if r.completed]
    failed = Counter(r.outcome for r in results if not r.completed)
    reasons: dict[str, str] = {}
    for r in results:
        if not r.completed and r.outcome not in reasons:
            reasons[r.outcome] = r.reason
    audio_s = sum(r.audio_s for r in results)
    lags = [x for r in results for x in r.partial_lags]
    p95s = _session_p95s(results)
    refs = [ref for r in completed for ref in r.refs]
    hyps = [hyp for r in completed for hyp in r.hyps]
    sends = sum(r.sends for r in results)
    late = sum(r.late_sends for r in results)
    procs: dict[str, Any] = {}
    for role, u in usage.items():
        procs[role] = {
            "processes": u.processes,
            "processes_seen": u.processes_seen,
            "cpu_s": round(u.cpu_s, 2),
            "cpu_ms_per_audio_s": round(1000 * u.cpu_s / audio_s, 3) if audio_s else None,
            "cpu_cores": round(u.cpu_s / wall_s, 3) if wall_s else None,
            "rss_mb_start": round(u.rss_start_kb / _MB, 1),
            "rss_mb_end": round(u.rss_end_kb / _MB, 1),
            "rss_mb_peak": round(u.rss_peak_kb / _MB, 1),
            "hwm_mb": round(u.hwm_kb / _MB, 1),
            "pss_mb_start": round(u.pss_start_kb / _MB, 1),
            "pss_mb_end": round(u.pss_end_kb / _MB, 1),
            "pss_mb_peak": round(u.pss_peak_kb / _MB, 1),
        }
    ours = client_cpu_s + sum(u.cpu_s for u in usage.values())
    cores = os.cpu_count() or 1
    load = {
        "cores": cores,
        "busy_cores": round(machine_busy_s / wall_s, 2) if wall_s else None,
        "measured_cores": round(ours / wall_s, 2) if wall_s else None,
        # Anything else running on the machine during the run (other jobs, the kernel's
        # network work not charged to a process): a run with a large share is not clean.
        "other_cores": round(max(0.0, machine_busy_s - ours) / wall_s, 2) if wall_s else None,
        # The hypervisor running other guests while this one had work: no process here, so
        # neither busy nor other load, but the run had less CPU than it asked for.
        "steal_cores": (
            round(machine_steal_s / wall_s, 2) if wall_s and machine_steal_s is not None else None
        ),
    }
    session_p95_max = max(p95s) * 1000 if p95s else None
    unmeasured = sum(1 for r in completed if not r.partial_lags)
    held, why = True, "every session completed and kept its p95 partial lag under the limit"
    if failed:
        held, why = False, count(sum(failed.values()), "session") + " failed"
    elif unmeasured or session_p95_max is None:
        # A session whose lag was never measured cannot be said to have kept it.
        unheard = count(unmeasured or len(completed), "session")
        held, why = False, f"{unheard} received no partial result"
    elif session_p95_max > criteria.lag_p95_limit_ms:
        held = False
        why = (
            f"a session's p95 partial lag reached {session_p95_max:.0f} ms "
            f"(limit {criteria.lag_p95_limit_ms:g} ms)"
        )
    return {
        "run": run,
        "sessions": {
            "requested": len(results),
            "completed": len(completed),
            "failed": dict(sorted(failed.items())),
            "failure_reasons": reasons,
        },
        "audio_s": round(audio_s, 1),
        "wall_s": round(wall_s, 1),
        "partial_lag_ms": _ms(summarize(lags)),
        "partial_lag_by_time": _lag_by_time(results),
        "session_partial_lag_p95_max_ms": (
            round(session_p95_max, 1) if session_p95_max is not None else None
        ),
        "endpoint_ms": _ms(summarize(x for r in results for x in r.endpoint)),
        "endpoint_after_vad_ms": _ms(summarize(x for r in results for x in r.endpoint_vad)),
        "start_ms": _ms(summarize(r.start_s for r in results if r.start_s is not None)),
        "sentences": {
            "total": sum(r.sentences for r in results),
            "flushed_by_stop": sum(r.flushed for r in results),
            "timed_out": sum(r.timed_out for r in results),
            "unmapped_results": sum(r.unmapped for r in results),
        },
        "wer": round(wer(refs, hyps), 4) if refs else None,
        "wer_sessions": len(completed),
        "client": {
            "processes": client_processes,
            "cpu_s": round(client_cpu_s, 2),
            "cpu_ms_per_audio_s": round(1000 * client_cpu_s / audio_s, 3) if audio_s else None,
            "sends": sends,
            f"sends_late_over_{LATE_S * 1000:.0f}ms": late,
            "late_max_ms": round(1000 * max((r.late_max_s for r in results), default=0.0), 1),
        },
        "procs": procs,
        "machine_load": load,
        "held": held,
        "held_reason": why,
    }


# --- text --------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _lag_cells(d: dict[str, Any] | None) -> list[str]:
    if not d:
        return ["-"] * 6
    return [_fmt(float(d[k])) for k in ("avg", "p50", "p90", "p95", "p99", "max")]


def table_header() -> list[str]:
    return [
        "streams",
        "ok",
        "failed",
        "lag avg",
        "p50",
        "p90",
        "p95",
        "p99",
        "max",
        "sess p95 max",
        "endpt p50",
        "endpt p95",
        "gw ms/s",
        "wk ms/s",
        "nats ms/s",
        "client ms/s",
        "gw RSS MB",
        "WER",
        "held",
    ]


def table_row(rep: dict[str, Any]) -> list[str]:
    procs = rep["procs"]

    def cpu(role: str) -> str:
        p = procs.get(role)
        return _fmt(p["cpu_ms_per_audio_s"], 2) if p else "-"

    gw = procs.get("gateway")
    ep = rep.get("endpoint_ms") or {}
    failed = rep["sessions"]["failed"]
    return [
        str(rep["sessions"]["requested"]),
        str(rep["sessions"]["completed"]),
        ",".join(f"{k}:{v}" for k, v in failed.items()) or "0",
        *_lag_cells(rep.get("partial_lag_ms")),
        _fmt(rep.get("session_partial_lag_p95_max_ms"), 0),
        _fmt(ep.get("p50"), 0),
        _fmt(ep.get("p95"), 0),
        cpu("gateway"),
        cpu("worker"),
        cpu("nats"),
        _fmt(rep["client"]["cpu_ms_per_audio_s"], 2),
        _fmt(gw["rss_mb_peak"], 1) if gw else "-",
        _fmt(rep.get("wer"), 3),
        "yes" if rep["held"] else "NO",
    ]


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for r in rows:
        lines.append(" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def rss_growth(series: Sequence[dict[str, float]], warmup_s: float) -> dict[str, dict[str, float]]:
    """Each role's RSS (and PSS) once warmed up (the first reading at or after ``warmup_s``)
    against its highest reading after that: whether memory stays flat under a steady load.

    Keys are the role (RSS) and ``"<role> PSS"``; forked workers share pages, so for them
    the sum of PSS is the memory they use.
    """
    after = [p for p in series if p["t"] >= warmup_s]
    out: dict[str, dict[str, float]] = {}
    keys = dict.fromkeys(k for p in after for k in p)  # PSS is in some readings only
    for key in keys:
        if key.endswith("_rss_mb"):
            name = key.removesuffix("_rss_mb")
        elif key.endswith("_pss_mb"):
            name = key.removesuffix("_pss_mb") + " PSS"
        else:
            continue
        points = [p for p in after if key in p]
        if len(points) < 2:
            continue
        warm = points[0][key]
        peak = max(p[key] for p in points)
        out[name] = {
            "warm_t_s": points[0]["t"],
            "warm_mb": warm,
            "max_after_mb": peak,
            "end_mb": points[-1][key],
            "growth_pct": round(100 * (peak - warm) / warm, 2) if warm else 0.0,
        }
    return out


def format_reports(reports: Sequence[dict[str, Any]]) -> str:
    """The table of one or more runs, plus the notes a reader needs."""
    out = [format_table([table_row(r) for r in reports], table_header())]
    out.append(
        "lag = partial lag (ms): receive time - send time of the audio up to payload.time; "
        "endpt = endpointing latency (ms, less max_sentence_silence); "
        "ms/s = CPU ms per second of streamed audio"
    )
    for r in reports:
        if r["sessions"]["failure_reasons"]:
            for code, reason in r["sessions"]["failure_reasons"].items():
                out.append(f"  {r['sessions']['requested']} streams: {code}: {reason}")
        load = r.get("machine_load") or {}
        if load.get("busy_cores") is not None:
            line = (
                f"  {r['sessions']['requested']} streams: machine busy {load['busy_cores']:.2f} of "
                f"{load['cores']} cores, measured processes {load['measured_cores']:.2f}, "
                f"other {load['other_cores']:.2f}"
            )
            steal = load.get("steal_cores")  # None: unknown (a report from before it)
            if steal is not None:
                line += f", steal {steal:.2f}"
            if load["other_cores"] > 0.25:
                line += " - WARNING: other load on the machine, figures are not clean"
            elif steal is not None and steal > 0.25:
                line += " - WARNING: the hypervisor took CPU (steal), figures are not clean"
            out.append(line)
        by_time = r.get("partial_lag_by_time")  # None in reports from before it
        if by_time:
            w = by_time["window_s"]
            cells = ", ".join(
                f"{x['from_s']:g}-{x['from_s'] + w:g} s {x['p95']:.0f}" for x in by_time["windows"]
            )
            out.append(
                f"  {r['sessions']['requested']} streams: partial lag p95 (ms) by time since "
                f"the first start: {cells}"
            )
        for role, g in (r.get("rss_growth") or {}).items():
            metric = role if role.endswith(" PSS") else f"{role} RSS"
            out.append(
                f"  {r['sessions']['requested']} streams: {metric} {g['warm_mb']:.1f} MB at "
                f"{g['warm_t_s']:.0f} s (warmed up), at most {g['max_after_mb']:.1f} MB after: "
                f"{g['growth_pct']:+.1f}%"
            )
        c = r["client"]
        late = next(v for k, v in c.items() if k.startswith("sends_late"))
        if c["sends"] and late > 0.01 * c["sends"]:
            out.append(
                f"  {r['sessions']['requested']} streams: WARNING {late} of {c['sends']} sends "
                f"were late by > {LATE_S * 1000:.0f} ms: the client may be the bottleneck "
                "(try --processes)"
            )
    return "\n".join(out)


# --- markdown (docs/benchmarks.md) -----------------------------------------------------------


def _stack_title(report: dict[str, Any]) -> str:
    stack = report.get("stack")
    if not stack:
        return "external stack"
    title = f"{stack['engine']}, {stack['workers']} workers x {stack['decoders']} decoders"
    if stack["engine"] != "loadtest":
        title += f" (final_pass {_final_pass(stack)})"
    return title


def _final_pass(stack: dict[str, Any]) -> str:
    """The final pass, with ``, at the close`` where its batch passes ran then (early_final
    off). Reports from before early_final have no such key: their batch pass ran at the
    close."""
    late = stack["final_pass"] != "live" and not stack.get("early_final", False)
    return f"{stack['final_pass']}, at the close" if late else stack["final_pass"]


def _markdown_row(r: dict[str, Any]) -> str:
    lag = r.get("partial_lag_ms") or {}
    ep = r.get("endpoint_ms") or {}
    vad = r.get("endpoint_after_vad_ms") or {}
    procs = r["procs"]

    def cpu(role: str) -> str:
        p = procs.get(role)
        return _fmt(p["cpu_ms_per_audio_s"], 2) if p else "-"

    gw = procs.get("gateway")
    cells = [
        str(r["sessions"]["requested"]),
        str(r["sessions"]["completed"]),
        *(_fmt(lag.get(k), 0) for k in ("avg", "p50", "p90", "p95", "p99", "max")),
        _fmt(ep.get("p50"), 0),
        _fmt(ep.get("p95"), 0),
        _fmt(vad.get("p95"), 0),
        cpu("gateway"),
        cpu("worker"),
        cpu("nats"),
        _fmt(r["client"]["cpu_ms_per_audio_s"], 2),
        _fmt(gw["rss_mb_peak"], 1) if gw else "-",
        "yes" if r["held"] else "no",
        _fmt((r.get("machine_load") or {}).get("other_cores"), 2),
    ]
    return "| " + " | ".join(cells) + " |"


MARKDOWN_HEADER = (
    "| streams | completed | partial lag avg | p50 | p90 | p95 | p99 | max "
    "| endpointing p50 | p95 | after VAD p95 | gateway CPU ms/s | workers ms/s "
    "| nats ms/s | client ms/s | gateway RSS MB | held | other load (cores) |"
)


def _steal_note(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Steal of the runs that had some (no column: it is rare, and unknown in old reports)."""
    steals = [
        f"{r['sessions']['requested']} streams {steal:.2f}"
        for r in runs
        if (steal := (r.get("machine_load") or {}).get("steal_cores"))
    ]
    if not steals:
        return []
    return ["", f"Steal (cores taken by the hypervisor, not in other load): {', '.join(steals)}."]


def markdown_tables(reports: Sequence[dict[str, Any]]) -> str:
    """Riva-style tables of saved JSON reports: one row per run, one table per stack.

    Runs of consecutive reports on the same stack share a table, sorted by streams.
    """
    out: list[str] = []
    sep = "|" + "---:|" * (MARKDOWN_HEADER.count("|") - 1)
    groups: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = []
    for report in reports:
        title = _stack_title(report)
        if not groups or groups[-1][0] != title:
            groups.append((title, [], []))
        groups[-1][1].extend(report.get("runs", []))
        if report.get("capacity"):
            groups[-1][2].append(report["capacity"])
    for title, runs, capacities in groups:
        runs = sorted(runs, key=lambda r: r["sessions"]["requested"])
        out += [f"**{title}**", "", MARKDOWN_HEADER, sep]
        out += [_markdown_row(r) for r in runs]
        out += _steal_note(runs)
        for cap in capacities:
            out += [
                "",
                f"Capacity: **{cap['held_sessions']}** sessions held (first failure at "
                f"{cap['first_failed_sessions']}; per-session p95 partial lag limit "
                f"{cap['lag_p95_limit_ms']:g} ms).",
            ]
        out.append("")
    return "\n".join(out)


def report_text(report: dict[str, Any]) -> str:
    lines: list[str] = []
    m = report["machine"]
    lines.append(
        f"machine: {m['cpus']} x {m['cpu_model']}, {m['mem_gib']} GiB, Python {m['python']}"
    )
    if "stack" in report:
        s = report["stack"]
        forked = "forked from one" if s.get("shared_workers", False) else "separate"
        gateways = count(s.get("gateways", 1), "gateway process", "gateway processes")
        lines.append(
            f"stack: nats-server, {gateways}, "
            f"{count(s['workers'], s['engine'] + ' worker')} ({forked}) x "
            f"{count(s['decoders'], 'decoder')} (final_pass {_final_pass(s)})"
        )
    baselines = [
        (f"engine baseline{label}", report[key])
        for key, label in (("engine_baseline", ""), ("engine_baseline_after", ", after the runs"))
        if key in report
    ]
    for title, b in baselines:
        lines.append(f"{title}:")
        lines.append(
            format_table(
                [
                    [
                        f"{b['rtf_live']:.3f}",
                        f"{b['rtf_batch']:.3f}",
                        f"{b['streams_per_core_live']:.1f}",
                        f"{b['streams_per_core_live_plus_batch']:.1f}",
                        f"{1000 * b['workload_cpu_per_s']:.0f}",
                        f"{b['workload_streams_per_core']:.1f}",
                        f"{b['engine_limit_streams']:.1f}",
                        f"{b['wer_live']:.3f}",
                        f"{b['wer_batch']:.3f}",
                    ]
                ],
                [
                    "RTF live",
                    "RTF full_utt",
                    "streams/core live",
                    "live+batch",
                    "bench ms/s",
                    "bench streams/core",
                    f"x {b['cores']} cores",
                    "WER live",
                    "WER batch",
                ],
            )
        )
    if "runs" in report:
        lines.append(format_reports(report["runs"]))
    if "capacity" in report:
        c = report["capacity"]
        line = (
            f"capacity: {count(c['held_sessions'], 'session')} held real time "
            f"(first failure at {c['first_failed_sessions']}, "
            f"p95 lag limit {c['lag_p95_limit_ms']:g} ms)"
        )
        if c.get("ratio_to_engine_limit") is not None:
            line += (
                f"; engine limit {c['engine_limit_streams']} streams, "
                f"ratio {c['ratio_to_engine_limit']:.2f}"
            )
        if c.get("ratio_to_engine_limit_after") is not None:
            line += (
                f"; after the runs {c['engine_limit_streams_after']} streams, "
                f"ratio {c['ratio_to_engine_limit_after']:.2f}"
            )
        lines.append(line)
    if "idle" in report:
        lines.append(json.dumps(report["idle"], indent=2))
    return "\n".join(lines)
