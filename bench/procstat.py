"""CPU accounting from /proc: per process (utime + stime) and for the whole machine.

Why /proc rather than each process timing itself: the service's processes are not ours to
instrument, and one reader taking every snapshot at the same instant gives figures that add up.
Processes are identified by (pid, start time), so a recycled pid is never read by mistake.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["CpuSample", "MachineSample", "ProcId", "children", "machine_sample", "sample"]

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcId:
    """A process as (pid, start time in clock ticks); `role` names it in reports."""

    pid: int
    start: int
    role: str

    @classmethod
    def of(cls, pid: int, role: str) -> ProcId | None:
        fields = _stat_fields(pid)
        return None if fields is None else cls(pid, int(fields[19]), role)


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds (user + system) and run-queue wait seconds of one process at one instant."""

    cpu: float
    runq_wait: float  # time runnable but not running (main thread; from schedstat): core contention


@dataclass(frozen=True)
class MachineSample:
    """Machine-wide CPU seconds from /proc/stat: busy (user..softirq), idle (+iowait), steal."""

    busy: float
    idle: float
    steal: float


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("latin-1")
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()  # fields from 3 (state) on; index 0 = field 3


def sample(proc: ProcId) -> CpuSample | None:
    """The process's CPU so far, or None if it is gone (or the pid now names another process)."""
    fields = _stat_fields(proc.pid)
    if fields is None or int(fields[19]) != proc.start:
        return None
    cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    wait = 0.0
    try:
        with open(f"/proc/{proc.pid}/schedstat") as f:
            wait = int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        pass
    return CpuSample(cpu, wait)


def children(pid: int) -> list[int]:
    """Direct children of a process (every thread's children list)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("latin-1").strip()
    except OSError:
        return ""


def machine_sample() -> MachineSample:
    with open("/proc/stat") as f:
        parts = f.readline().split()
    values = [int(x) / TICK for x in parts[1:]]
    user, nice, system, idle, iowait, irq, softirq = values[:7]
    steal = values[7] if len(values) > 7 else 0.0
    return MachineSample(user + nice + system + irq + softirq, idle + iowait, steal)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
