"""CPU time of a process, read from ``/proc`` (Linux); its peak memory is ``devstack.worker_process``'s.

``cpu_seconds`` is user + system time of the process itself (``/proc/<pid>/stat``
fields 14 and 15, in clock ticks); ``thread_cpu_seconds`` splits it by thread
(``/proc/<pid>/task``) into the worker's event loop, its other Python threads and
native threads; ``schedstat_seconds`` is the main thread's (the worker's event loop) time on a
CPU and time runnable but waiting for one (``/proc/<pid>/schedstat``), which tells
a loop that is busy from a loop that is starved by the other processes on the cores.
The parsers are pure and take the files' text.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def parse_cpu_seconds(stat: str, ticks_per_s: int = CLOCK_TICKS_PER_S) -> float:
    """User + system seconds from the text of ``/proc/<pid>/stat``."""
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of the whole line
    return (utime + stime) / ticks_per_s


def parse_comm(stat: str) -> str:
    """The command (thread) name, field 2, from the text of a ``stat`` file."""
    return stat[stat.index("(") + 1 : stat.rindex(")")]


#: The groups of ``thread_cpu_s``: the main thread runs the worker's event loop; threads that keep
#: the process's own name are Python threads (the image pool); native libraries name theirs (grpc's
#: ``event_engine``, ``grpc_global_tim``, libuv's ``libuv-worker``).
THREAD_GROUPS = ("event_loop", "python_threads", "native_threads")


def thread_cpu_s(stats: Mapping[int, str], pid: int) -> dict[str, float]:
    """User + system seconds of a process's live threads (``stat`` texts by thread id), by ``THREAD_GROUPS``."""
    name = parse_comm(stats[pid]) if pid in stats else None
    groups = dict.fromkeys(THREAD_GROUPS, 0.0)
    for tid, stat in stats.items():
        group = "event_loop" if tid == pid else "python_threads" if parse_comm(stat) == name else "native_threads"
        groups[group] += parse_cpu_seconds(stat)
    return groups


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


def parse_schedstat(text: str) -> tuple[float, float]:
    """Seconds on a CPU and seconds runnable but waiting for one, from ``/proc/<pid>/schedstat`` (ns)."""
    running_ns, waiting_ns = text.split()[:2]
    return int(running_ns) / 1e9, int(waiting_ns) / 1e9


def schedstat_seconds(pid: int) -> tuple[float, float]:
    """``parse_schedstat`` of the main thread of ``pid``; ``(0, 0)`` where the kernel keeps no such file."""
    try:
        return parse_schedstat(Path(f"/proc/{pid}/schedstat").read_text())
    except FileNotFoundError:
        return 0.0, 0.0


def cpu_seconds(pid: int) -> float:
    return parse_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid``'s live threads by group (a thread that has exited is in no group)."""
    stats: dict[int, str] = {}
    for stat_path in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            stats[int(stat_path.parent.name)] = stat_path.read_text()
        except OSError:
            continue  # exited while we looked
    return thread_cpu_s(stats, pid)


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
