"""CPU time and peak resident memory of a process, read from ``/proc`` (Linux).

``cpu_seconds`` is user + system time of the process itself (``/proc/<pid>/stat``
fields 14 and 15, in clock ticks); ``peak_rss_bytes`` is ``VmHWM``, the high-water
mark of its resident set. The parsers are pure and take the files' text.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def parse_cpu_seconds(stat: str, ticks_per_s: int = CLOCK_TICKS_PER_S) -> float:
    """User + system seconds from the text of ``/proc/<pid>/stat``."""
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of the whole line
    return (utime + stime) / ticks_per_s


def parse_peak_rss_bytes(status: str) -> int:
    """``VmHWM`` in bytes from the text of ``/proc/<pid>/status``."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit.lower() != "kb":
                raise ValueError(f"unexpected VmHWM unit {unit!r}")
            return int(value) * 1024
    raise ValueError("no VmHWM in status")


def parse_pgid(stat: str) -> int:
    """The process group id (field 5) from the text of ``/proc/<pid>/stat``."""
    return int(stat[stat.rindex(")") + 2 :].split()[2])


def group_cpu_seconds(pgid: int) -> float:
    """User + system seconds of the live processes of a process group (a stack component and its children)."""
    total = 0.0
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_path.read_text()
        except OSError:
            continue  # exited while we looked
        if parse_pgid(stat) == pgid:
            total += parse_cpu_seconds(stat)
    return total


def cpu_seconds(pid: int) -> float:
    return parse_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())


def peak_rss_bytes(pid: int) -> int:
    return parse_peak_rss_bytes(Path(f"/proc/{pid}/status").read_text())


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
