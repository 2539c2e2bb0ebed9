"""CPU time and memory of a process, read from ``/proc`` (Linux).

Two readers: ``asrd bench`` watches the processes under test from outside, and each asrd
process reports its own on ``/metrics`` (:class:`asrd.metrics.ProcessMetrics`).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TICKS", "ProcSample", "boot_time", "max_fds", "open_fds", "read_proc"]

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class ProcSample:
    cpu_s: float  # user + system CPU seconds since the process started
    rss_kb: int  # VmRSS
    hwm_kb: int  # VmHWM: peak RSS since the process started
    # Pss: RSS with each page shared by N processes counted 1/N. Forked workers share the
    # engine's model, so only the sum of their PSS is the memory they use together.
    pss_kb: int = 0
    started_s: float = 0.0  # when the process started, seconds after the machine booted
    vm_kb: int = 0  # VmSize: virtual memory


def read_proc(pid: int, *, pss: bool = False) -> ProcSample | None:
    """CPU and memory of ``pid``; None when it is gone (or not readable).

    ``pss`` also reads Pss, which costs the kernel a walk of the process's page tables
    (~2.6 ms for a 250 MB worker, holding its memory-map lock): not for every sample.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after its closing ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)
    started = int(fields[19]) / TICKS  # starttime (field 22)
    rss = hwm = vm = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
        elif line.startswith("VmSize:"):
            vm = int(line.split()[1])
    return ProcSample(cpu, rss, hwm, _pss_kb(pid) if pss else 0, started, vm)


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def boot_time() -> float:
    """When the machine booted, in seconds since the epoch (``btime`` of ``/proc/stat``)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def max_fds() -> int:
    """This process's soft limit on open file descriptors."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
