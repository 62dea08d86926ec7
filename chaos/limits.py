"""A memory limit for a worker process, as a container's would be: a cgroup where one can be made, else ``RLIMIT_AS``.

A cgroup limits what the process really holds (resident pages, shared
memory included), and its kernel ends the process past it, as a pod's OOM
kill would; the harness sees that as a worker that exited. ``RLIMIT_AS``
limits address space instead, which a Python process with gRPC's threads
reserves far beyond what it touches, so it is only the fallback where no
cgroup may be created (no privileges): there the limit is raised by
``ADDRESS_SPACE_SLACK_BYTES``.
"""

from __future__ import annotations

import contextlib
import resource
import time
import uuid
from pathlib import Path

CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
#: Address space a Python worker reserves and never touches (thread stacks, malloc arenas, mapped libraries).
ADDRESS_SPACE_SLACK_BYTES = 2 << 30
#: Seconds ``close`` waits for the group's last processes (a killed worker's helpers) to exit.
CLOSE_TIMEOUT_S = 10.0


class MemoryLimit:
    """``limit_bytes`` for the processes ``add``ed; ``peak_bytes`` and ``oom_kills`` read back what happened."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.kind = "rlimit_as"
        self._group: Path | None = None
        self._final: tuple[int | None, int | None] | None = None
        name = f"tritonq-chaos-{uuid.uuid4().hex[:8]}"
        for parent, files in (
            (CGROUP_V2, ("memory.max", "memory.swap.max")),
            (CGROUP_V1_MEMORY, ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")),
        ):
            if not (parent / files[0]).exists() and not (parent / "cgroup.controllers").exists():
                continue
            group = parent / name
            try:
                group.mkdir()
                (group / files[0]).write_text(str(limit_bytes))
            except OSError:
                with contextlib.suppress(OSError):
                    group.rmdir()
                continue
            with contextlib.suppress(OSError):  # no swap beyond the limit either, where swap is accounted
                (group / files[1]).write_text("0" if files[1] == "memory.swap.max" else str(limit_bytes))
            self._group, self.kind = group, "cgroup_v2" if parent == CGROUP_V2 else "cgroup_v1"
            return

    def add(self, pid: int) -> None:
        """Put a process (and the children it starts from now on) under the limit."""
        if self._group is not None:
            (self._group / "cgroup.procs").write_text(str(pid))
        else:
            bound = self.limit_bytes + ADDRESS_SPACE_SLACK_BYTES
            resource.prlimit(pid, resource.RLIMIT_AS, (bound, bound))

    def peak_bytes(self) -> int | None:
        """The group's peak memory (cgroup v1 ``max_usage_in_bytes``, v2 ``memory.peak`` where the kernel has it)."""
        if self._final is not None:
            return self._final[0]
        if self._group is None:
            return None
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            with contextlib.suppress(OSError, ValueError):
                return int((self._group / name).read_text())
        return None

    def oom_kills(self) -> int | None:
        if self._final is not None:
            return self._final[1]
        if self._group is None:
            return None
        for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
            with contextlib.suppress(OSError):
                for line in (self._group / name).read_text().splitlines():
                    field, _, value = line.partition(" ")
                    if field == key:
                        return int(value)
        return None

    def close(self) -> None:
        """Keep the group's figures and remove it once its processes are gone (the kernel refuses while any is left)."""
        if self._group is None or self._final is not None:
            return
        self._final = (self.peak_bytes(), self.oom_kills())
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                self._group.rmdir()
                return
            except OSError:
                time.sleep(0.1)  # a polling interval: the processes' exit is what is waited for
