"""CPU time and memory of the processes under test (:mod:`asrd.procfs`), by role, over a run.

:class:`ProcSet` names the processes of a stack by role (``gateway``, ``worker``, ``nats``,
``client``); :class:`Sampler` reads them periodically during a run, so a report can give CPU
seconds over exactly the run, the peak and final RSS, and an RSS time series (for soak runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from asrd.procfs import TICKS, ProcSample, read_proc

__all__ = [
    "ProcSample",
    "ProcSet",
    "Sampler",
    "children_of",
    "parse_pids",
    "read_proc",
]


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, not idle/iowait) since boot."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return 0.0
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    guest = sum(values[8:10]) if len(values) > 9 else 0  # already counted in user/nice
    return (sum(values) - idle - guest) / TICKS


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
    """Processes under test by role; several PIDs of one role are summed."""

    roles: dict[str, list[int]] = field(default_factory=dict)

    def read(self, *, pss: bool = False) -> dict[str, list[ProcSample | None]]:
        return {role: [read_proc(p, pss=pss) for p in pids] for role, pids in self.roles.items()}


@dataclass
class RoleUsage:
    """One role over a run: CPU seconds used, and RSS (kB, summed over its processes)."""

    processes: int
    cpu_s: float
    rss_start_kb: int
    rss_end_kb: int
    rss_peak_kb: int  # largest sampled sum of VmRSS
    hwm_kb: int  # sum of VmHWM at the end (peak since each process started)
    pss_start_kb: int = 0
    pss_end_kb: int = 0
    pss_peak_kb: int = 0  # largest sampled sum of Pss (sampled less often than RSS)


class Sampler:
    """Reads a :class:`ProcSet` at the start, every ``interval_s``, and at the end of a run;
    PSS at the start, the end, and every ``pss_interval_s``."""

    def __init__(
        self, procs: ProcSet, interval_s: float = 1.0, pss_interval_s: float = 30.0
    ) -> None:
        self.procs = procs
        self.interval_s = interval_s
        self.pss_interval_s = pss_interval_s
        self._pss_last = 0.0
        self.first: dict[str, list[ProcSample | None]] = {}
        self.last: dict[str, list[ProcSample | None]] = {}
        # One point per reading: "t" (s since start), "<role>_rss_mb", "<role>_cpu_s", and
        # "<role>_pss_mb" in the readings that read PSS.
        self.series: list[dict[str, float]] = []
        self._peak: dict[str, int] = {}
        self._pss_peak: dict[str, int] = {}
        self._t0 = 0.0
        self._busy0 = 0.0
        self._busy_last = 0.0
        self.machine_busy_s = 0.0  # whole machine, between start() and stop()

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = self._busy_last = machine_busy_s()
        self.first = self.procs.read(pss=True)
        self._pss_last = time.monotonic()
        self._record(self.first, pss=True)

    def stop(self) -> None:
        self.last = self.procs.read(pss=True)
        self._record(self.last, pss=True)
        self.machine_busy_s = self._busy_last - self._busy0

    async def run(self) -> None:
        """Sample until cancelled (the caller calls :meth:`start` and :meth:`stop`)."""
        while True:
            await trio.sleep(self.interval_s)
            pss = time.monotonic() - self._pss_last >= self.pss_interval_s
            if pss:
                self._pss_last = time.monotonic()
            self._record(self.procs.read(pss=pss), pss=pss)

    def _record(self, reading: dict[str, list[ProcSample | None]], *, pss: bool) -> None:
        busy = machine_busy_s()
        point: dict[str, float] = {
            "t": round(time.monotonic() - self._t0, 2),
            "machine_busy_s": round(busy - self._busy0, 2),
        }
        self._busy_last = busy
        for role, samples in reading.items():
            kb = sum(s.rss_kb for s in samples if s)
            self._peak[role] = max(self._peak.get(role, 0), kb)
            point[f"{role}_rss_mb"] = round(kb / 1024, 1)
            if pss:
                pss_kb = sum(s.pss_kb for s in samples if s)
                self._pss_peak[role] = max(self._pss_peak.get(role, 0), pss_kb)
                point[f"{role}_pss_mb"] = round(pss_kb / 1024, 1)
            point[f"{role}_cpu_s"] = round(sum(s.cpu_s for s in samples if s), 2)
        self.series.append(point)

    def usage(self) -> dict[str, RoleUsage]:
        out: dict[str, RoleUsage] = {}
        for role, first in self.first.items():
            last = self.last.get(role, [])
            cpu = 0.0
            for a, b in zip(first, last, strict=False):
                if a is not None and b is not None:
                    cpu += b.cpu_s - a.cpu_s
            out[role] = RoleUsage(
                processes=len(first),
                cpu_s=cpu,
                rss_start_kb=sum(s.rss_kb for s in first if s),
                rss_end_kb=sum(s.rss_kb for s in last if s),
                rss_peak_kb=self._peak.get(role, 0),
                hwm_kb=sum(s.hwm_kb for s in last if s),
                pss_start_kb=sum(s.pss_kb for s in first if s),
                pss_end_kb=sum(s.pss_kb for s in last if s),
                pss_peak_kb=self._pss_peak.get(role, 0),
            )
        return out
