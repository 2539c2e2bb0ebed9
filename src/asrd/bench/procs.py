"""CPU time and memory of the processes under test (:mod:`asrd.procfs`), by role, over a run.

:class:`ProcSet` names the processes of a stack by role (``gateway``, ``worker``, ``nats``,
``client``); :class:`Sampler` reads them periodically during a run, so a report can give CPU
seconds over exactly the run, the peak and final RSS, and an RSS time series (for soak runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from asrd.procfs import TICKS, ProcSample, read_proc

__all__ = [
    "MachineCpu",
    "ProcSample",
    "ProcSet",
    "Sampler",
    "children_of",
    "machine_busy_s",
    "machine_cpu",
    "parse_cpu_line",
    "parse_pids",
    "read_proc",
]


@dataclass(frozen=True, slots=True)
class MachineCpu:
    """CPU seconds of the whole machine (all cores) since boot, from ``/proc/stat``."""

    busy_s: float  # running something here: not idle, iowait or steal
    # The hypervisor ran another guest while this one had work: no process here used it.
    steal_s: float


def parse_cpu_line(line: str) -> MachineCpu:
    """The ``cpu`` line of ``/proc/stat``: user nice system idle iowait irq softirq steal
    guest guest_nice, in clock ticks (older kernels have fewer fields)."""
    values = [int(v) for v in line.split()[1:]]
    idle = sum(values[3:5])  # idle + iowait
    steal = values[7] if len(values) > 7 else 0
    guest = sum(values[8:10])  # already counted in user/nice
    return MachineCpu((sum(values) - idle - steal - guest) / TICKS, steal / TICKS)


def machine_cpu() -> MachineCpu:
    try:
        with open("/proc/stat") as f:
            return parse_cpu_line(f.readline())
    except OSError:
        return MachineCpu(0.0, 0.0)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, not idle/iowait/steal) since
    boot."""
    return machine_cpu().busy_s


def since_boot_s() -> float:
    """Seconds since the machine booted, on the clock of :attr:`ProcSample.started_s`."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from ``/proc/PID/task/*/children``)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(set(out))


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def parse_pids(spec: str) -> dict[str, list[int]]:
    """``gateway=12,worker=13,worker=14`` -> ``{"gateway": [12], "worker": [13, 14]}``."""
    roles: dict[str, list[int]] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        role, sep, pid = item.partition("=")
        if not sep or not pid.strip().isdigit():
            raise ValueError(f"bad --pids item {item!r}: expected ROLE=PID")
        roles.setdefault(role.strip(), []).append(int(pid))
    return roles


@dataclass
class ProcSet:
    """Processes under test by role; several PIDs of one role are summed.

    ``parents``: processes whose children belong to the role too, listed again at each
    reading: a supervisor (asrd.prefork) forks a child again when one dies, and the new one
    must be measured from then on.
    """

    roles: dict[str, list[int]] = field(default_factory=dict)
    parents: dict[str, list[int]] = field(default_factory=dict)

    def pids(self) -> dict[str, list[int]]:
        """Each role's processes now: its own PIDs and its parents' current children."""
        out = {role: list(pids) for role, pids in self.roles.items()}
        for role, parents in self.parents.items():
            pids = out.setdefault(role, [])
            for parent in parents:
                pids += [p for p in children_of(parent) if p not in pids]
        return out

    def read(self, *, pss: bool = False) -> dict[str, list[ProcSample | None]]:
        return {role: [read_proc(p, pss=pss) for p in pids] for role, pids in self.pids().items()}

    def read_pids(self, *, pss: bool = False) -> dict[str, dict[int, ProcSample]]:
        """Each role's processes that could be read, by PID (one that is gone is left out)."""
        out: dict[str, dict[int, ProcSample]] = {}
        for role, pids in self.pids().items():
            samples = {p: read_proc(p, pss=pss) for p in pids}
            out[role] = {p: s for p, s in samples.items() if s is not None}
        return out


@dataclass
class RoleUsage:
    """One role over a run: CPU seconds used, and RSS (kB, summed over its processes)."""

    processes: int  # at the start of the run
    cpu_s: float
    rss_start_kb: int
    rss_end_kb: int
    rss_peak_kb: int  # largest sampled sum of VmRSS
    hwm_kb: int  # sum of VmHWM at the end (peak since each process started)
    pss_start_kb: int = 0
    pss_end_kb: int = 0
    pss_peak_kb: int = 0  # largest sampled sum of Pss (sampled less often than RSS)
    # Every process read during the run: more than ``processes`` when one exited or was
    # forked (again) meanwhile.
    processes_seen: int = 0


@dataclass
class _Seen:
    """A process read during a run: the CPU it had used before the run, and its last reading
    (the last before it exited, for one that did)."""

    cpu_before_s: float
    last: ProcSample


class Sampler:
    """Reads a :class:`ProcSet` at the start, every ``interval_s``, and at the end of a run;
    PSS at the start, the end, and every ``pss_interval_s``.

    A process that exits during the run counts up to its last reading (up to ``interval_s``
    of its CPU is lost); one that appears counts from its fork if it was forked during the
    run, else from its first reading.
    """

    def __init__(
        self, procs: ProcSet, interval_s: float = 1.0, pss_interval_s: float = 30.0
    ) -> None:
        self.procs = procs
        self.interval_s = interval_s
        self.pss_interval_s = pss_interval_s
        self._pss_last = 0.0
        self._stopped = False
        self.first: dict[str, dict[int, ProcSample]] = {}
        self.last: dict[str, dict[int, ProcSample]] = {}
        # One point per reading: "t" (s since start), "<role>_rss_mb", "<role>_cpu_s" (since
        # each process started, those that exited included), and "<role>_pss_mb" in the
        # readings that read PSS.
        self.series: list[dict[str, float]] = []
        # role -> (pid, start time) -> process: a PID may be reused by another process.
        self._seen: dict[str, dict[tuple[int, float], _Seen]] = {}
        self._peak: dict[str, int] = {}
        self._pss_peak: dict[str, int] = {}
        self._t0 = 0.0
        self._boot0 = 0.0  # the start, in seconds since boot
        self._cpu0 = self._cpu_last = MachineCpu(0.0, 0.0)
        self.machine_busy_s = 0.0  # whole machine, between start() and stop()
        self.machine_steal_s = 0.0  # taken by the hypervisor, between start() and stop()

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._boot0 = since_boot_s()
        self._cpu0 = self._cpu_last = machine_cpu()
        self.first = self.procs.read_pids(pss=True)
        self._pss_last = time.monotonic()
        self._record(self.first, pss=True)

    def stop(self) -> None:
        self._stopped = True
        self.last = self.procs.read_pids(pss=True)
        self._record(self.last, pss=True)
        self.machine_busy_s = self._cpu_last.busy_s - self._cpu0.busy_s
        self.machine_steal_s = self._cpu_last.steal_s - self._cpu0.steal_s

    def sample(self) -> None:
        """One reading during the run (with PSS every ``pss_interval_s``)."""
        pss = self._pss_due()
        self._record(self.procs.read_pids(pss=pss), pss=pss)

    def _pss_due(self) -> bool:
        pss = time.monotonic() - self._pss_last >= self.pss_interval_s
        if pss:
            self._pss_last = time.monotonic()
        return pss

    async def run(self) -> None:
        """Sample until cancelled (the caller calls :meth:`start` and :meth:`stop`).

        The readings are taken in a thread: the in-process load generator shares this event
        loop, and reading PSS walks each process's page tables (~2.5 ms per 250 MB worker),
        a pause every session would have measured as lag. A reading that ends after
        :meth:`stop` is dropped: the run's figures end with the reading taken there.
        """
        while not self._stopped:
            await trio.sleep(self.interval_s)
            pss = self._pss_due()
            reading = await trio.to_thread.run_sync(partial(self.procs.read_pids, pss=pss))
            if self._stopped:
                return
            self._record(reading, pss=pss)

    def _cpu_before_run(self, sample: ProcSample) -> float:
        """CPU seconds of a newly seen process that are not the run's: none if it was forked
        during the run (a worker forked again), else all it had used by this reading."""
        return 0.0 if sample.started_s >= self._boot0 else sample.cpu_s

    def _record(self, reading: dict[str, dict[int, ProcSample]], *, pss: bool) -> None:
        cpu = machine_cpu()
        point: dict[str, float] = {
            "t": round(time.monotonic() - self._t0, 2),
            "machine_busy_s": round(cpu.busy_s - self._cpu0.busy_s, 2),
            "machine_steal_s": round(cpu.steal_s - self._cpu0.steal_s, 2),
        }
        self._cpu_last = cpu
        for role, samples in reading.items():
            seen = self._seen.setdefault(role, {})
            for pid, s in samples.items():
                key = (pid, s.started_s)
                if key in seen:
                    seen[key].last = s
                else:
                    seen[key] = _Seen(self._cpu_before_run(s), s)
            kb = sum(s.rss_kb for s in samples.values())
            self._peak[role] = max(self._peak.get(role, 0), kb)
            point[f"{role}_rss_mb"] = round(kb / 1024, 1)
            if pss:
                pss_kb = sum(s.pss_kb for s in samples.values())
                self._pss_peak[role] = max(self._pss_peak.get(role, 0), pss_kb)
                point[f"{role}_pss_mb"] = round(pss_kb / 1024, 1)
            point[f"{role}_cpu_s"] = round(sum(p.last.cpu_s for p in seen.values()), 2)
        self.series.append(point)

    def usage(self) -> dict[str, RoleUsage]:
        out: dict[str, RoleUsage] = {}
        for role, seen in self._seen.items():
            first = self.first.get(role, {}).values()
            last = self.last.get(role, {}).values()
            out[role] = RoleUsage(
                processes=len(first),
                cpu_s=sum(p.last.cpu_s - p.cpu_before_s for p in seen.values()),
                rss_start_kb=sum(s.rss_kb for s in first),
                rss_end_kb=sum(s.rss_kb for s in last),
                rss_peak_kb=self._peak.get(role, 0),
                hwm_kb=sum(s.hwm_kb for s in last),
                pss_start_kb=sum(s.pss_kb for s in first),
                pss_end_kb=sum(s.pss_kb for s in last),
                pss_peak_kb=self._pss_peak.get(role, 0),
                processes_seen=len(seen),
            )
        return out
