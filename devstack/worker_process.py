"""``tritonq run`` as a child process, as it runs in a pod: the one wrapper the demo, benchmark and fault scenarios use.

The worker runs as its own process so that its CPU time, memory and exit
status are its own, and so that signals reach it as Kubernetes sends them
(SIGTERM to drain, SIGKILL as a crash or the OOM killer would). It serves its
HTTP endpoints on a port picked free at run time; its output goes to a log
file that a failure message points at. A process may be started again after
it exited (a restart), and its peak resident memory is kept over all its lives.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from devstack.probe import StackError, free_port, http_ok, wait_until

#: Seconds the worker may take to start and report ready (imports, Triton catalog, subscriber).
READY_TIMEOUT_S = 120.0
#: Seconds the worker gets to drain and exit after SIGTERM before ``stop`` kills it.
STOP_TIMEOUT_S = 60.0
#: Seconds a scrape of ``/metrics`` may take: every histogram is rendered.
METRICS_TIMEOUT_S = 5.0


def parse_peak_rss_bytes(status: str) -> int:
    """``VmHWM`` (the high-water mark of the resident set) in bytes, from the text of ``/proc/<pid>/status``."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit.lower() != "kb":
                raise ValueError(f"unexpected VmHWM unit {unit!r}")
            return int(value) * 1024
    raise ValueError("no VmHWM in status")


def peak_rss_bytes(pid: int) -> int:
    """The peak resident set of a live process, in bytes (Linux)."""
    return parse_peak_rss_bytes(Path(f"/proc/{pid}/status").read_text())


class WorkerFailed(StackError):
    """The worker exited, did not get ready, or did not finish its jobs in time."""


class WorkerProcess:
    """``tritonq run`` with ``env`` (and its own ``TRITONQ_HTTP_PORT``); as a context manager, always stopped.

    ``on_spawn`` is called with the pid as soon as the process exists, before it
    has imported anything (to put it under a memory limit, say).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        http_port: int | None = None,
        on_spawn: Callable[[int], None] | None = None,
    ) -> None:
        self.port = http_port or free_port()
        self.env = {**env, "TRITONQ_HTTP_PORT": str(self.port)}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        #: Times the process was started (restarts included).
        self.starts = 0
        self._on_spawn = on_spawn
        self._peak_rss_bytes = 0

    def __enter__(self) -> WorkerProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise StackError("worker not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise StackError("worker already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "run"],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if self._on_spawn is not None:
            self._on_spawn(self.proc.pid)
        self.starts += 1

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until ``/readyz`` answers 200; ``WorkerFailed`` if the process exits or the deadline passes."""
        try:
            wait_until(lambda: http_ok(f"{self.url}/readyz"), "worker", timeout_s, lambda: self.running)
        except StackError as exc:
            raise WorkerFailed(f"{exc}; see {self.log_path}") from exc

    def wait_metrics(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until the worker's HTTP server answers (the first thing it starts)."""
        try:
            wait_until(lambda: http_ok(f"{self.url}/metrics"), "worker's metrics", timeout_s, lambda: self.running)
        except StackError as exc:
            raise WorkerFailed(f"{exc}; see {self.log_path}") from exc

    def metrics(self) -> str:
        """The text of ``/metrics`` now (``OSError`` while the server does not answer)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=METRICS_TIMEOUT_S) as response:
            text: str = response.read().decode()
            return text

    def peak_rss_bytes(self) -> int:
        """The largest peak resident set (``VmHWM``) seen over this process's lives; read now if it lives."""
        if self.proc is not None:
            with contextlib.suppress(OSError, ValueError):  # exited, or a zombie (no VmHWM)
                self._peak_rss_bytes = max(self._peak_rss_bytes, peak_rss_bytes(self.proc.pid))
        return self._peak_rss_bytes

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a node loss would: no shutdown code runs. Nothing when not running."""
        if self.proc is None:
            return
        self.peak_rss_bytes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout_s: float) -> tuple[int, float]:
        """SIGTERM, as Kubernetes sends it; SIGKILL past ``timeout_s``. The exit status and the seconds it took."""
        if self.proc is None:
            raise StackError("worker not started")
        self.peak_rss_bytes()
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9, time.monotonic() - started
        return code, time.monotonic() - started

    def wait_exit(self, timeout_s: float) -> tuple[int | None, float]:
        """Wait for the process to exit on its own: its status (``None`` if it still runs) and the wait."""
        if self.proc is None:
            raise StackError("worker not started")
        started = time.monotonic()
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - started
        return code, time.monotonic() - started

    def stop(self) -> None:
        """Let a running worker drain and exit (``terminate``); idempotent."""
        if self.running:
            self.terminate(STOP_TIMEOUT_S)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def log_lines(self) -> list[dict[str, Any]]:
        """The log's JSON lines, parsed (other lines skipped)."""
        out: list[dict[str, Any]] = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out
