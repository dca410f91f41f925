"""What the kernel says about a process: CPU time and peak resident memory (Linux ``/proc``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cpu_seconds", "peak_rss_bytes", "thread_cpu_seconds"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by every thread of ``pid``.

    From ``/proc/<pid>/stat`` fields 14 (utime) and 15 (stime), in clock ticks.
    """
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size of ``pid`` (``VmHWM`` in ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """User + system CPU seconds used so far by one thread (``/proc/<pid>/task/<tid>/stat``)."""
    text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
