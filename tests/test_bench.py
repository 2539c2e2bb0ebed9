"""``asrd bench``: its statistics as pure functions, and small real runs against real stacks.

No test here asserts a speed: the bench measures speed, the docs record it.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pydantic
import pytest
import trio
import trio_websocket

from asrd import gctune
from asrd.bench.corpus import Playlist, default_data_dir, load_corpus
from asrd.bench.load import (
    COMPLETED,
    LoadPlan,
    SessionResult,
    SessionSpec,
    run_load,
    run_session,
    schedule,
    split,
)
from asrd.bench.procs import (
    MachineCpu,
    ProcSample,
    ProcSet,
    Sampler,
    machine_busy_s,
    parse_cpu_line,
    parse_pids,
    read_proc,
)
from asrd.bench.report import (
    HoldCriteria,
    build_report,
    format_reports,
    markdown_tables,
    report_text,
    rss_growth,
)
from asrd.bench.stack import StackConfig, open_stack, render_toml
from asrd.bench.stats import (
    FrameClock,
    by_window,
    endpoint_latency_s,
    percentile,
    summarize,
)

DATA = Path(__file__).parent / "data"
GUARD_S = 240  # hang guard for the real runs, not a speed threshold


@pytest.fixture
def restore_gc() -> Any:
    """run_load tunes the collector of the process it runs in: give pytest its own back."""
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


# --- statistics --------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy_linear() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([7.0], 99) == 7.0
    ten = [float(v) for v in range(1, 11)]
    assert percentile(ten, 95) == pytest.approx(9.55)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_summarize() -> None:
    assert summarize([]) is None
    s = summarize([0.3, 0.1, 0.2])
    assert s is not None
    assert (s.count, s.p50, s.max) == (3, 0.2, 0.3)
    assert s.avg == pytest.approx(0.2)
    ms = s.scaled(1000).as_dict(1)
    assert ms == {
        **{"count": 3, "avg": 200.0, "p50": 200.0},
        **{"p90": 280.0, "p95": 290.0, "p99": 298.0, "max": 300.0},
    }


def test_by_window_sums_up_each_window_from_the_start() -> None:
    points = [(99.0, 7.0), (100.0, 1.0), (109.9, 3.0), (110.0, 5.0), (135.0, 2.0)]
    windows = by_window(points, 100.0, 10.0)
    assert [t for t, _ in windows] == [0.0, 10.0, 30.0]  # none in 20-30: not listed
    first = windows[0][1]
    assert (first.count, first.p50, first.max) == (3, 3.0, 7.0)  # 99.0 counts in the first
    assert [s.max for _, s in windows[1:]] == [5.0, 2.0]
    assert by_window([], 0.0, 10.0) == []
    with pytest.raises(ValueError):
        by_window(points, 100.0, 0.0)


def test_frame_clock_maps_stream_time_to_the_frame_that_completes_it() -> None:
    clock = FrameClock([1600, 1600, 800], 16000)  # 100 ms, 100 ms, 50 ms
    assert clock.frames == 3
    assert clock.frame_end_s(1) == pytest.approx(0.2)
    times = (0, 1, 100, 100.0625, 200, 201, 250, 9999)
    assert [clock.frame_of(ms) for ms in times] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert clock.sent_at(150) is None  # not sent yet
    clock.sent(0, 10.0)
    clock.sent(1, 10.1)
    assert clock.sent_at(100) == 10.0
    assert clock.sent_at(150) == 10.1
    with pytest.raises(ValueError):
        FrameClock([0], 16000)


def test_endpoint_latency_subtracts_the_required_silence() -> None:
    assert endpoint_latency_s(11.0, 10.0, 800) == pytest.approx(0.2)
    # at 2x real time, 800 ms of silence takes 400 ms to send
    assert endpoint_latency_s(11.0, 10.0, 800, speed=2.0) == pytest.approx(0.6)


# --- corpus and plan ---------------------------------------------------------------------


def test_default_data_dir_is_the_checkouts_tests_data() -> None:
    assert default_data_dir().resolve() == DATA.resolve()


def test_playlist_is_whole_recordings_separated_by_silence() -> None:
    corpus = load_corpus(DATA)
    assert len(corpus.clips) == 5 and all(c.reference for c in corpus.clips)
    p = Playlist.build(corpus, first=3, min_duration_s=12.0, gap_ms=1500, frame_ms=100)
    assert p.duration_s >= 12.0
    assert [i.clip.name for i in p.items] == [
        c.name for c in (corpus.clips * 2)[3 : 3 + len(p.items)]
    ]
    assert p.items[0].start_ms == 300
    for a, b in zip(p.items, p.items[1:], strict=False):
        assert b.start_ms == a.end_ms + 1500
    assert p.references() == [i.clip.reference for i in p.items]
    assert b"".join(p.frames) == p.pcm
    assert all(n == 1600 for n in p.frame_samples[:-1]) and 0 < p.frame_samples[-1] <= 1600
    assert p.item_at(0) == 0
    assert p.item_at(p.items[1].start_ms) == 1
    assert p.item_at(p.items[1].start_ms - 1) == 0
    one = Playlist.build(corpus, first=0, min_duration_s=0.0, gap_ms=900)
    assert len(one.items) == 1


def test_load_corpus_needs_transcripts(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_corpus(tmp_path)


def test_schedule_spreads_starts_and_split_shares_them() -> None:
    specs = schedule(4, start_at=100.0, ramp_s=2.0)
    assert [s.start_at for s in specs] == [100.0, 100.5, 101.0, 101.5]
    assert [s.first_clip for s in specs] == [0, 1, 2, 3]
    parts = split(specs, 3)
    assert [[s.index for s in p] for p in parts] == [[0, 3], [1], [2]]
    assert split(specs, 9) == [(s,) for s in specs]


def test_plan_and_results_survive_json() -> None:
    specs = schedule(2, start_at=1.0, ramp_s=1.0)
    plan = LoadPlan("ws://x/ws/v1", specs, "d", 5.0, params={"enable_words": False})
    assert LoadPlan.from_json(plan.to_json()) == plan
    assert plan.start_params()["enable_words"] is False
    r = SessionResult(3, partial_lags=[0.01234567], hyps=["a"], refs=["b"])
    assert SessionResult.from_dict(json.loads(json.dumps(r.to_dict()))) == SessionResult(
        3, partial_lags=[0.012346], hyps=["a"], refs=["b"]
    )


async def test_a_session_closed_early_counts_only_the_frames_it_sent(
    nursery: trio.Nursery,
) -> None:
    """``sends`` is what the late-sends warning is a share of: a session the server closed
    after two frames sent two or three, not its whole playlist."""

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        start = json.loads(await ws.get_message())
        header = {**start["header"], "name": "TranscriptionStarted", "status": 20000000}
        await ws.send_message(json.dumps({"header": header, "payload": {"session_id": "s"}}))
        for _ in range(2):
            await ws.get_message()
        await ws.aclose()

    server = await nursery.start(
        partial(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
    )
    plan = LoadPlan(
        f"ws://127.0.0.1:{server.port}/ws/v1", (), str(DATA), duration_s=5.0, reply_timeout_s=5.0
    )
    playlist = Playlist.build(load_corpus(DATA), first=0, min_duration_s=5.0, gap_ms=1500)
    with trio.fail_after(GUARD_S):  # a hang guard, not a speed threshold
        result = await run_session(plan, SessionSpec(0, time.monotonic(), 0), playlist)
    assert result.outcome == "closed"
    assert len(playlist.frames) > 50
    assert 2 <= result.sends < 10
    assert result.audio_s == pytest.approx(result.sends * 0.1)


# --- report ------------------------------------------------------------------------------


def _result(index: int, lags: list[float], **kw: Any) -> SessionResult:
    return SessionResult(index, partial_lags=lags, audio_s=10.0, **kw)


def _report(results: list[SessionResult], limit_ms: float = 50.0) -> dict[str, Any]:
    return build_report(
        results,
        usage={},
        machine_busy_s=1.0,
        client_cpu_s=0.5,
        client_processes=1,
        wall_s=10.0,
        run={},
        criteria=HoldCriteria(limit_ms),
    )


def test_report_holds_only_when_every_session_keeps_its_p95_under_the_limit() -> None:
    good = [
        _result(0, [0.01, 0.02, 0.03], endpoint=[0.1], hyps=["he was not"], refs=["he was not"]),
        _result(1, [0.02] * 10, hyps=["an ill"], refs=["an ill disposed"]),
    ]
    rep = _report(good)
    assert rep["held"] is True
    assert rep["sessions"]["completed"] == 2 and rep["sessions"]["failed"] == {}
    assert rep["partial_lag_ms"]["count"] == 13
    assert rep["endpoint_ms"]["p50"] == 100.0
    assert rep["wer"] == pytest.approx(1 / 6, abs=1e-4)
    assert rep["client"]["cpu_ms_per_audio_s"] == 25.0
    slow = [*good, _result(2, [0.01] * 18 + [0.2, 0.3])]
    rep = _report(slow)
    assert rep["held"] is False and "p95" in rep["held_reason"]
    failed = [*good, _result(2, [], outcome="40000005", reason="busy")]
    rep = _report(failed)
    assert rep["held"] is False and rep["held_reason"] == "1 session failed"
    assert rep["sessions"]["failed"] == {"40000005": 1}
    assert rep["wer_sessions"] == 2  # failed sessions are not scored
    assert "40000005: busy" in format_reports([rep])


def test_report_shows_when_in_the_run_the_partials_were_late() -> None:
    """Partial lag per 10 s from the first session's scheduled start, over every session."""
    early = _result(0, [0.5, 0.05, 0.04], started_at=1000.0)
    early.partial_received = [1003.0, 1012.0, 1025.0]
    late = _result(1, [0.9, 0.03], started_at=1004.0)
    late.partial_received = [1008.0, 1031.0]
    rep = _report([early, late])
    by_time = rep["partial_lag_by_time"]
    assert by_time["window_s"] == 10.0
    windows = by_time["windows"]
    assert [(w["from_s"], w["count"], w["max"]) for w in windows] == [
        (0.0, 2, 900.0),
        (10.0, 1, 50.0),
        (20.0, 1, 40.0),
        (30.0, 1, 30.0),
    ]
    assert sum(w["count"] for w in windows) == rep["partial_lag_ms"]["count"]
    assert "partial lag p95 (ms) by time since the first start: 0-10 s 880, 10-20 s 50" in (
        format_reports([rep])
    )
    unscheduled = _result(0, [0.05], partial_received=[5.0])
    assert _report([unscheduled])["partial_lag_by_time"] is None  # no start known
    untimed = _result(0, [0.05], started_at=1.0)  # a result from before the receive times
    assert _report([untimed])["partial_lag_by_time"] is None


def test_a_session_whose_lag_was_never_measured_does_not_hold() -> None:
    """Every session must keep its p95 under the limit: one with no partial result to measure
    (all unmapped, or none sent) cannot be said to."""
    good = _result(0, [0.05] * 20)
    silent = _result(1, [])
    rep = _report([good, silent])
    assert rep["held"] is False and rep["held_reason"] == "1 session received no partial result"
    rep = _report([good, silent, _result(2, [])])
    assert rep["held_reason"] == "2 sessions received no partial result"


def _fake_attempts(
    monkeypatch: pytest.MonkeyPatch, outcomes: dict[int, list[tuple[bool, float]]]
) -> list[int]:
    """Replace one attempt of a run by scripted (held, other cores) outcomes per N."""
    from asrd.bench import command

    tried: list[int] = []

    async def attempt(args: Any, target: Any, corpus: Any, n: int, baseline: Any) -> dict[str, Any]:
        tried.append(n)
        held, other = outcomes[n].pop(0)
        return {"n": n, "held": held, "machine_load": {"other_cores": other}}

    monkeypatch.setattr(command, "_one_attempt", attempt)
    return tried


def _search_args(**kw: Any) -> Any:
    import argparse

    base = dict(
        start=2, max=64, resolution=0.05, settle=0.0, retry_noisy=0, noise_limit=0.25,
        engine="loadtest", spawn=True, lag_limit_ms=300.0,
    )  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


async def test_a_rerun_that_holds_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run disturbed by other jobs is repeated; if the repeat holds, N held, however noisy."""
    from asrd.bench.command import one_run

    _fake_attempts(monkeypatch, {8: [(False, 0.30), (True, 0.40)]})
    rep = await one_run(_search_args(retry_noisy=3), None, None, 8, None)  # type: ignore[arg-type]
    assert (rep["held"], rep["attempts"]) == (True, 2)
    _fake_attempts(monkeypatch, {8: [(False, 0.50), (False, 0.30), (False, 0.10)]})
    rep = await one_run(_search_args(retry_noisy=3), None, None, 8, None)  # type: ignore[arg-type]
    assert rep["held"] is False and rep["machine_load"]["other_cores"] == 0.10
    assert rep["attempts"] == 3  # the third was clean: no fourth


async def test_capacity_search_doubles_then_bisects_to_the_largest_n_that_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asrd.bench.command import find_capacity
    from asrd.bench.procs import ProcSet
    from asrd.bench.stack import Target

    limit = 21  # runs hold up to here
    outcomes = {n: [(n <= limit, 0.0)] for n in range(1, 65)}
    tried = _fake_attempts(monkeypatch, outcomes)
    target = Target("ws://x", ProcSet({}), None, None)
    out = await find_capacity(_search_args(), target, None, None)  # type: ignore[arg-type]
    assert tried == [2, 4, 8, 16, 32, 24, 20, 22, 21]
    assert out["capacity"]["held_sessions"] == limit
    assert out["capacity"]["first_failed_sessions"] == limit + 1


# --- /proc and stack helpers ---------------------------------------------------------------


def test_rss_growth_compares_the_warmed_up_reading_with_the_highest_after_it() -> None:
    series = [
        {"t": 0.0, "gateway_rss_mb": 50.0, "gateway_cpu_s": 0.0},
        {"t": 30.0, "gateway_rss_mb": 80.0, "gateway_cpu_s": 1.0},  # still warming up
        {"t": 60.0, "gateway_rss_mb": 100.0, "gateway_cpu_s": 2.0},
        {"t": 90.0, "gateway_rss_mb": 104.0, "gateway_cpu_s": 3.0},
        {"t": 120.0, "gateway_rss_mb": 102.0, "gateway_cpu_s": 4.0},
    ]
    g = rss_growth(series, warmup_s=60.0)["gateway"]
    assert (g["warm_t_s"], g["warm_mb"], g["max_after_mb"], g["end_mb"]) == (60, 100, 104, 102)
    assert g["growth_pct"] == 4.0
    assert rss_growth(series, warmup_s=500.0) == {}  # the run never warmed up


def test_pss_growth_uses_only_the_readings_that_have_pss() -> None:
    series = [
        {"t": 0.0, "worker_rss_mb": 500.0, "worker_pss_mb": 200.0},
        {"t": 60.0, "worker_rss_mb": 510.0},
        {"t": 65.0, "worker_rss_mb": 512.0},
        {"t": 90.0, "worker_rss_mb": 515.0, "worker_pss_mb": 210.0},
        {"t": 120.0, "worker_rss_mb": 514.0, "worker_pss_mb": 213.0},
    ]
    growth = rss_growth(series, warmup_s=60.0)
    assert growth["worker"]["warm_mb"] == 510 and growth["worker"]["max_after_mb"] == 515
    pss = growth["worker PSS"]
    assert (pss["warm_t_s"], pss["warm_mb"], pss["max_after_mb"]) == (90, 210, 213)


def test_proc_readings_of_this_process() -> None:
    me = read_proc(os.getpid())
    assert me is not None and me.cpu_s > 0 and me.rss_kb > 0 and me.hwm_kb >= me.rss_kb
    assert me.pss_kb == 0  # only when asked: reading it walks the page tables
    with_pss = read_proc(os.getpid(), pss=True)
    assert with_pss is not None and 0 < with_pss.pss_kb <= with_pss.rss_kb + 1024
    assert read_proc(2**22 + 12345) is None
    assert machine_busy_s() > 0
    assert parse_pids("gateway=1, worker=2,worker=3") == {"gateway": [1], "worker": [2, 3]}
    with pytest.raises(ValueError):
        parse_pids("gateway")


def test_a_process_set_lists_a_parents_children_at_each_reading() -> None:
    """A supervisor's children are found again at each reading, not once: a child that exits
    leaves the role, and one forked later joins it."""
    procs = ProcSet({"worker": [os.getpid()]}, parents={"worker": [os.getpid()]})
    child = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        assert child.pid in procs.pids()["worker"]
        assert child.pid in procs.read_pids()["worker"]
    finally:
        child.communicate(b"")
    assert child.pid not in procs.pids()["worker"]
    assert procs.pids()["worker"][0] == os.getpid()


class FakeProc:
    """A process table in place of /proc: PID -> sample, and one supervisor's children."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, supervisor: int, boot0: float) -> None:
        from asrd.bench import procs

        self.table: dict[int, ProcSample] = {}
        self.supervisor = supervisor
        self.cpu = MachineCpu(0.0, 0.0)
        monkeypatch.setattr(procs, "read_proc", lambda pid, pss=False: self.table.get(pid))
        monkeypatch.setattr(procs, "children_of", self.children)
        monkeypatch.setattr(procs, "since_boot_s", lambda: boot0)
        monkeypatch.setattr(procs, "machine_cpu", lambda: self.cpu)

    def children(self, pid: int) -> list[int]:
        return sorted(p for p in self.table if p != pid) if pid == self.supervisor else []

    def set(self, pid: int, cpu_s: float, rss_kb: int, started_s: float = 10.0) -> None:
        self.table[pid] = ProcSample(cpu_s, rss_kb, rss_kb, rss_kb // 2, started_s)


def test_sampler_counts_a_worker_that_is_forked_again_during_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one that died counts up to its last reading; its replacement, forked during the
    run, counts from its fork, and its memory is the role's."""
    boot0 = 1000.0  # the run starts 1000 s after boot
    fake = FakeProc(monkeypatch, supervisor=10, boot0=boot0)
    fake.set(10, 5.0, 100_000)  # the supervisor
    fake.set(11, 2.0, 50_000)
    fake.set(12, 3.0, 50_000)
    sampler = Sampler(ProcSet({"worker": [10]}, parents={"worker": [10]}))
    sampler.start()
    fake.set(11, 4.0, 50_000)
    fake.set(12, 3.5, 50_000)
    sampler.sample()
    del fake.table[11]  # killed, and forked again as 13, which has used 0.5 s by its first read
    fake.set(13, 0.5, 60_000, started_s=boot0 + 5.0)
    sampler.sample()
    fake.set(10, 5.1, 100_000)
    fake.set(12, 4.5, 50_000)
    fake.set(13, 1.5, 80_000, started_s=boot0 + 5.0)
    sampler.stop()
    worker = sampler.usage()["worker"]
    assert worker.cpu_s == pytest.approx(0.1 + (4.0 - 2.0) + (4.5 - 3.0) + 1.5)
    assert (worker.processes, worker.processes_seen) == (3, 4)
    assert (worker.rss_start_kb, worker.rss_end_kb) == (200_000, 230_000)
    assert worker.rss_peak_kb == worker.hwm_kb == 230_000
    assert worker.pss_end_kb == worker.pss_peak_kb == 115_000
    # The series' CPU (since each process started) keeps the one that exited.
    assert [p["worker_cpu_s"] for p in sampler.series] == [10.0, 12.5, 13.0, 15.1]


def test_sampler_takes_a_late_process_forked_before_the_run_from_its_first_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeProc(monkeypatch, supervisor=10, boot0=1000.0)
    fake.set(10, 5.0, 100_000)
    sampler = Sampler(ProcSet({"worker": [10]}, parents={"worker": [10]}))
    sampler.start()
    fake.set(11, 7.0, 50_000, started_s=999.0)  # its 7 s were used before the run
    sampler.sample()
    fake.set(11, 7.5, 50_000, started_s=999.0)
    sampler.stop()
    assert sampler.usage()["worker"].cpu_s == pytest.approx(0.5)


async def test_sampler_reads_proc_off_the_event_loop_and_drops_a_reading_after_stop() -> None:
    """The in-process load generator shares the sampler's event loop: a reading (PSS walks
    each worker's page tables, milliseconds each) must not pause its sessions, and one that
    ends after stop() must not change the run's figures."""
    loop_thread = threading.get_ident()
    release = threading.Event()
    sampled = threading.Event()  # a reading after start()'s
    threads: list[int] = []

    class SlowProcs(ProcSet):
        def read_pids(self, *, pss: bool = False) -> dict[str, dict[int, ProcSample]]:
            threads.append(threading.get_ident())
            if len(threads) > 1:
                sampled.set()
            if threading.get_ident() == loop_thread:
                return {"worker": {10: ProcSample(1.0, 100, 100)}}
            release.wait()  # a slow reading, still running when the run stops
            return {"worker": {10: ProcSample(99.0, 100, 100)}}

    sampler = Sampler(SlowProcs(), interval_s=0.0)
    sampler.start()
    with trio.fail_after(GUARD_S):  # a hang guard, not a speed threshold
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler.run)
            await trio.to_thread.run_sync(sampled.wait)
            assert threads[1] != loop_thread
            sampler.stop()
            release.set()
            nursery.cancel_scope.cancel()
    assert len(sampler.series) == 2  # start and stop
    assert sampler.usage()["worker"].cpu_s == 0.0


def test_steal_is_not_busy_or_other_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hypervisor's steal is read apart from the machine's busy time and reported on
    its own: it is no process on this machine."""
    from asrd.procfs import TICKS

    #         user nice system idle iowait irq softirq steal guest guest_nice
    line = "cpu  100 5 50 1000 20 3 7 40 10 2"
    cpu = parse_cpu_line(line)
    assert cpu.busy_s == pytest.approx(165 / TICKS)  # user + nice + system + irq + softirq
    assert cpu.steal_s == pytest.approx(40 / TICKS)
    assert parse_cpu_line("cpu  100 5 50 1000 20 3 7").steal_s == 0.0  # an old kernel

    fake = FakeProc(monkeypatch, supervisor=0, boot0=0.0)
    fake.cpu = MachineCpu(100.0, 7.0)
    sampler = Sampler(ProcSet({}))
    sampler.start()
    fake.cpu = MachineCpu(103.0, 9.0)
    sampler.stop()
    assert (sampler.machine_busy_s, sampler.machine_steal_s) == (3.0, 2.0)
    assert sampler.series[-1]["machine_steal_s"] == 2.0

    rep = build_report(
        [_result(0, [0.01])],
        usage={},
        machine_busy_s=sampler.machine_busy_s,
        machine_steal_s=sampler.machine_steal_s,
        client_cpu_s=0.5,
        client_processes=1,
        wall_s=10.0,
        run={},
        criteria=HoldCriteria(),
    )
    load = rep["machine_load"]
    assert (load["busy_cores"], load["other_cores"], load["steal_cores"]) == (0.3, 0.25, 0.2)
    assert "other 0.25, steal 0.20" in format_reports([rep])
    assert "Steal (cores taken by the hypervisor, not in other load): 1 streams 0.20." in (
        markdown_tables([{"runs": [rep]}])
    )


def test_a_report_from_before_steal_still_renders() -> None:
    rep = _report([_result(0, [0.01])])
    assert rep["machine_load"]["steal_cores"] is None  # not measured: unknown
    del rep["machine_load"]["steal_cores"]
    assert "steal" not in format_reports([rep])
    assert "Steal" not in markdown_tables([{"runs": [rep]}])


def test_stack_config_renders_valid_asrd_toml() -> None:
    from asrd.config import Config

    text = render_toml(StackConfig(engine="loadtest", decoders=7).sections(12345))
    config = Config.model_validate(tomllib.loads(text))
    assert config.server.port == 12345 and config.worker.engine == "loadtest"
    assert config.worker.decoders == 7


def test_decoders_per_worker_are_bounded_with_a_clear_error() -> None:
    from asrd.config import MAX_DECODERS, Config

    most = StackConfig(engine="loadtest", decoders=MAX_DECODERS).sections(12345)
    assert Config.model_validate(tomllib.loads(render_toml(most))).worker.decoders == MAX_DECODERS
    too_many = StackConfig(engine="loadtest", decoders=MAX_DECODERS + 1).sections(12345)
    with pytest.raises(pydantic.ValidationError, match=f"less than or equal to {MAX_DECODERS}"):
        Config.model_validate(tomllib.loads(render_toml(too_many)))
    proc = subprocess.run(
        [sys.executable, "-m", "asrd", "bench", "--spawn", "--decoders", str(MAX_DECODERS + 1)],
        capture_output=True,
        text=True,
        timeout=GUARD_S,
        check=False,
    )
    assert proc.returncode == 2
    assert f"--decoders is at most {MAX_DECODERS} per worker" in proc.stderr


# --- real runs -------------------------------------------------------------------------------


def _bench(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "asrd", "--log-level", "warning", "bench", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=GUARD_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


@pytest.mark.integration
def test_bench_spawn_with_the_loadtest_engine_reports_every_figure() -> None:
    # Two forked workers and one decode slot: the sessions take turns through asrd.cpugate.
    report = _bench(
        *("--spawn", "--engine", "loadtest", "--workers", "2", "--decoders", "2"),
        *("--decode-slots", "1", "--trailing-silence-ms", "6000", "--no-sched-batch"),
        *("--sessions", "3", "--duration", "3", "--ramp", "0.5", "--speed", "2"),
    )
    assert report["stack"]["engine"] == "loadtest"
    assert report["stack"]["decode_slots"] == 1
    assert report["stack"]["sched_batch"] is False
    assert report["stack"]["trailing_silence_ms"] == 6000
    assert report["machine"]["cpus"] == os.cpu_count()
    (run,) = report["runs"]
    assert run["sessions"]["requested"] == run["sessions"]["completed"] == 3
    assert run["sessions"]["failed"] == {}
    for key in ("partial_lag_ms", "endpoint_ms", "endpoint_after_vad_ms", "start_ms"):
        assert set(run[key]) == {"count", "avg", "p50", "p90", "p95", "p99", "max"}, key
        assert run[key]["count"] > 0
    assert isinstance(run["wer"], float)  # placeholder text: high, but scored
    assert run["sentences"]["unmapped_results"] == 0
    by_time = run["partial_lag_by_time"]["windows"]
    assert by_time[0]["from_s"] == 0.0
    assert sum(w["count"] for w in by_time) == run["partial_lag_ms"]["count"]
    assert run["audio_s"] >= 9.0
    for role, count in (("gateway", 1), ("worker", 3), ("nats", 1)):  # workers: parent + 2
        proc = run["procs"][role]
        assert proc["processes"] == count and proc["cpu_s"] >= 0 and proc["rss_mb_peak"] > 0
        assert proc["cpu_ms_per_audio_s"] is not None
    # The gateway relays every frame, and the forked workers' CPU is read too (in clock ticks:
    # nats-server's few milliseconds may round to none).
    assert run["procs"]["gateway"]["cpu_s"] > 0 and run["procs"]["worker"]["cpu_s"] > 0
    assert run["client"]["sends"] > 0
    assert isinstance(run["held"], bool) and run["held_reason"]
    assert run["series"] and "gateway_rss_mb" in run["series"][0]


@pytest.mark.integration
def test_idle_sessions_mode_measures_memory_per_session() -> None:
    report = _bench(
        *("--spawn", "--engine", "loadtest", "--workers", "1", "--decoders", "8"),
        *("--idle-sessions", "4", "--settle", "0.5"),
    )
    idle = report["idle"]
    assert (idle["connected"], idle["started"], idle["failed"]) == (4, 4, {})
    assert idle["idle_timeout_s"] >= 600
    assert {"kb_per_connection", "kb_per_started_session"} <= set(idle["gateway"])


async def test_load_generator_tunes_its_collector_before_the_clock_starts(
    restore_gc: None,
) -> None:
    """A gen-2 collection in the client pauses every session at once, and each result
    received meanwhile is measured late by the pause: the client tunes itself first."""
    gc.set_threshold(700, 10, 10)
    gc.unfreeze()
    plan = LoadPlan("ws://127.0.0.1:1/ws/v1", (), str(DATA), duration_s=2.0)
    assert await run_load(plan) == []
    assert gc.get_threshold()[0] == gctune.GEN0_THRESHOLD
    assert gc.get_freeze_count() > 1000  # the corpus and playlists among them


@pytest.mark.integration
async def test_in_process_and_sharded_clients_give_the_same_kind_of_results(
    restore_gc: None,
) -> None:
    """One stack; the same plan run in this process and by a shard process."""
    with trio.fail_after(GUARD_S):
        async with open_stack(StackConfig(engine="loadtest", workers=1, decoders=4)) as stack:
            sampler = Sampler(stack.procs, 0.2)
            sampler.start()
            base = LoadPlan(stack.url, (), str(DATA), duration_s=2.0, speed=4.0)
            now = time.monotonic()
            plan = replace(base, sessions=schedule(2, start_at=now, ramp_s=0.2))
            local = await run_load(plan)
            now = time.monotonic()
            shard_plan = replace(base, sessions=schedule(2, start_at=now + 1.0, ramp_s=0.2))
            proc = await trio.run_process(
                [sys.executable, "-m", "asrd.bench.shard"],
                stdin=shard_plan.to_json().encode(),
                capture_stdout=True,
            )
            sampler.stop()
    remote = [SessionResult.from_dict(r) for r in json.loads(proc.stdout)["results"]]
    for results in (local, remote):
        assert [r.outcome for r in results] == [COMPLETED, COMPLETED]
        assert all(r.partial_lags and r.endpoint and r.sends for r in results)
        assert all(len(r.partial_received) == len(r.partial_lags) for r in results)
        assert [r.refs for r in results] == [r.refs for r in local]
    # One clock for every process: when each partial came is comparable across shards.
    assert [r.started_at for r in local] == [x.start_at for x in plan.sessions]
    assert [r.started_at for r in remote] == [x.start_at for x in shard_plan.sessions]
    for r in remote:
        assert r.started_at is not None
        assert r.started_at < min(r.partial_received) < time.monotonic()
    usage = sampler.usage()
    assert set(usage) == {"gateway", "worker", "nats"}
    assert usage["gateway"].cpu_s > 0


def _recordings(tmp_path: Path, *names: str) -> Path:
    """A corpus of these recordings of tests/data and their transcripts."""
    lines = (DATA / "librivox.transcription").read_text().splitlines()
    for name in names:
        shutil.copy(DATA / f"{name}.wav", tmp_path)
    (tmp_path / "some.transcription").write_text(
        "".join(next(x for x in lines if name in x) + "\n" for name in names)
    )
    return tmp_path


def _one_recording(tmp_path: Path) -> Path:
    """A corpus of one short recording and its transcript."""
    return _recordings(tmp_path, "sense_and_sensibility_01_austen_64kb-0880")


@pytest.mark.integration
def test_engine_baseline_on_one_short_recording(tmp_path: Path) -> None:
    _one_recording(tmp_path)
    report = _bench(
        "--engine-baseline", "--baseline-repeat", "1", "--data", str(tmp_path), "--duration", "5"
    )
    b = report["engine_baseline"]
    assert b["session_s"] == 5.0 and b["workload_audio_s"] >= 5.0
    assert b["rtf_live"] > 0 and b["rtf_batch"] > 0
    assert b["streams_per_core_live"] == pytest.approx(1 / b["rtf_live"], rel=0.01)
    assert b["engine_limit_streams"] > 0 and b["cores"] == os.cpu_count()
    assert 0.0 <= b["wer_batch"] <= 1.0


def test_the_engine_baseline_decodes_the_bench_sessions_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's limit is the cost of the sessions the bench sends, whole: ``adaptive``
    decodes one sentence twice per session, and a one-recording stream per session charged
    that to every recording (16-34% on the cost per stream-second)."""
    from asrd.bench.baseline import run_baseline
    from asrd.bench.load import playlists_for
    from asrd.engines import pocketsphinx as ps

    names = [
        "sense_and_sensibility_01_austen_64kb-0880",
        "sense_and_sensibility_01_austen_64kb-0920",
    ]
    corpus = load_corpus(_recordings(tmp_path, *names))
    calibrations: list[int] = []
    adapt = ps.PocketsphinxRecognizer._adapt

    def counted(self: ps.PocketsphinxRecognizer) -> None:
        calibrations.append(id(self))
        adapt(self)

    monkeypatch.setattr(ps.PocketsphinxRecognizer, "_adapt", counted)
    b = run_baseline(corpus, final_pass="adaptive", session_s=9.0, repeat=1)
    specs = tuple(SessionSpec(i, 0.0, i) for i in range(len(names)))
    bench = playlists_for(LoadPlan("ws://x/ws/v1", specs, str(tmp_path), 9.0), corpus)
    # One session starting at each recording, each as long as the bench's, 4 recordings in all.
    assert all(p.duration_s >= 9.0 and len(p.items) == 2 for p in bench.values())
    assert b.workload_audio_s == pytest.approx(sum(p.duration_s for p in bench.values()), abs=1e-3)
    assert b.session_s == 9.0
    assert len(calibrations) == len(names)  # once per session, not per recording


@pytest.mark.integration
def test_engine_baseline_brackets_a_capacity_search(tmp_path: Path) -> None:
    # The machine's speed drifts: the engine is measured before the service runs and after.
    _one_recording(tmp_path)
    report = _bench(
        *("--engine-baseline", "--baseline-repeat", "1", "--data", str(tmp_path)),
        *("--spawn", "--engine", "loadtest", "--workers", "1", "--decoders", "2"),
        *("--find-capacity", "--start", "1", "--max", "1", "--lag-limit-ms", "60000"),
        *("--duration", "3", "--ramp", "0", "--speed", "2"),
    )
    before, after = report["engine_baseline"], report["engine_baseline_after"]
    assert before["engine_limit_streams"] > 0 and after["engine_limit_streams"] > 0
    cap = report["capacity"]
    assert cap["held_sessions"] == 1
    assert cap["engine_limit_streams"] == before["engine_limit_streams"]
    assert cap["engine_limit_streams_after"] == after["engine_limit_streams"]
    # The ratio is 1 / the unrounded limit, rounded to 0.001; the limit shown is rounded to
    # 0.1, which moves 1 / limit by up to 0.05 / limit².
    limit = after["engine_limit_streams"]
    assert cap["ratio_to_engine_limit_after"] == pytest.approx(
        1 / limit, abs=0.0005 + 0.05 / (limit - 0.05) ** 2 + 1e-9
    )
    text = report_text(report)
    assert "engine baseline:" in text and "engine baseline, after the runs:" in text
    # Counted in the singular for one: the search held one session on one of everything.
    assert "capacity: 1 session held real time" in text
    assert "stack: nats-server, 1 gateway process, 1 loadtest worker (forked from one) x 2 " in text
    assert f"after the runs {cap['engine_limit_streams_after']} streams" in text


def test_markdown_tables_group_runs_by_stack() -> None:
    run = _report([_result(0, [0.01, 0.02], hyps=["a"], refs=["a"])])
    stack = {"engine": "loadtest", "workers": 2, "decoders": 3, "final_pass": "live"}
    capacity = {"held_sessions": 5, "first_failed_sessions": 6, "lag_p95_limit_ms": 300}
    nine = {**run, "sessions": {**run["sessions"], "requested": 9}}
    reports = [
        {"stack": stack, "runs": [nine]},
        {"stack": stack, "runs": [run]},
        {"stack": {**stack, "engine": "pocketsphinx"}, "runs": [run], "capacity": capacity},
    ]
    text = markdown_tables(reports)
    assert text.count("| streams |") == 2
    assert "**loadtest, 2 workers x 3 decoders**" in text
    assert "**pocketsphinx, 2 workers x 3 decoders (final_pass live)**" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "streams" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "9", "1"]
    assert "Capacity: **5** sessions held" in text
    # The batch final pass, run early (now) or at each sentence's close; also adaptive's.
    for final_pass in ("batch", "adaptive"):
        for early, label in ((True, final_pass), (False, f"{final_pass}, at the close")):
            batch = {**stack, "engine": "pocketsphinx", "final_pass": final_pass}
            batch["early_final"] = early
            tables = markdown_tables([{"stack": batch, "runs": [run]}])
            assert f"(final_pass {label})**" in tables
