"""Runs of the idiomatic peer (``bench/peer.py``) on the stack, reduced to the figures of the product's runs.

The peer runs as its own process on a backlog published ahead, as the product's
main run does, with its own topic, subscription and output buckets. Its CPU is
read from ``/proc`` (``bench.procstat``), as the worker's is: the baseline when
it has built its clients and not yet subscribed, the end when it reports its
last job done; its throughput, latency and stage timings come from the records
it wrote, read back by the same code as the worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from bench import procstat, workload
from bench.runs import MIN_RATE_PER_S, RUN_SLACK_S, Lab, RunFigures, RunSpec, publish_backlog, run_figures
from bench.sampling import Sample
from devstack.worker_process import WorkerFailed, peak_rss_bytes
from worker.client import JobClient

#: Seconds the peer may take to import and build its clients.
READY_TIMEOUT_S = 60.0
#: Seconds the peer gets to shut down once told to, before it is killed.
STOP_TIMEOUT_S = 30.0
#: Seconds between samples of the peer's CPU while it works.
SAMPLE_INTERVAL_S = 1.0
#: Seconds without a job finished after which the run is abandoned.
STALL_S = 60.0


class PeerProcess:
    """``python -m bench.peer`` as a child process; a context manager that always stops it."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "bench.peer", *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.done = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode().strip()
            if line == "ready":
                self.ready.set()
            elif line == "finished":
                self.finished.set()
            elif line.startswith("done "):
                self.done = int(line.split()[1])

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready.wait(0.1):
            if not self.alive or time.monotonic() > deadline:
                raise WorkerFailed(f"the peer did not start; see {self.log_path}")

    def go(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(b"go\n")
        self._proc.stdin.flush()

    def cpu_seconds(self) -> float:
        return procstat.cpu_seconds(self._proc.pid)

    def peak_rss_mb(self) -> float:
        return peak_rss_bytes(self._proc.pid) / 2**20

    def stop(self) -> None:
        """Close its stdin (it shuts down and exits), then SIGKILL past the timeout; idempotent."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


async def watch(peer: PeerProcess, total: int, timeout_s: float, progress: Callable[[int], None]) -> list[Sample]:
    """Start the peer on its backlog and sample its CPU until it has finished ``total`` jobs.

    The first sample is the peer idle, clients built (the run's CPU baseline); the last
    is taken once it reports ``total`` jobs done.
    """
    samples = [Sample(at=time.monotonic(), done=0, busy=0, nacked=0, cpu_s=peer.cpu_seconds())]
    peer.go()
    deadline = time.monotonic() + timeout_s
    shown, progressed = 0, time.monotonic()
    while True:
        finished = await asyncio.to_thread(peer.finished.wait, SAMPLE_INTERVAL_S)
        if not peer.alive:
            raise WorkerFailed(f"the peer exited while it had jobs to do; see {peer.log_path}")
        now = time.monotonic()
        samples.append(Sample(at=now, done=peer.done, busy=1, nacked=0, cpu_s=peer.cpu_seconds()))
        if peer.done > shown:
            progress(peer.done - shown)
            shown, progressed = peer.done, now
        if finished:
            return samples
        if now > deadline or now - progressed > STALL_S:
            raise WorkerFailed(f"the peer finished {shown}/{total} jobs; see {peer.log_path}")


async def peer_run(lab: Lab, spec: RunSpec) -> RunFigures:
    """Publish ``spec.jobs`` jobs, then start the peer and let it drain them."""
    settings = lab.settings(spec.name)
    args = [
        f"--project={settings.project}",
        f"--subscription={settings.subscription_path}",
        f"--triton-url={lab.stack.triton.grpc_url}",
        f"--gcs-url={lab.stack.gcs.url}",
        f"--jobs={spec.jobs}",
    ]
    env = {**os.environ, **lab.stack.environment(settings)}
    async with JobClient(settings) as client:
        jobs = await publish_backlog(lab, spec, settings, client)
        before = await asyncio.to_thread(lab.triton_snapshot)
        with PeerProcess(args, env, lab.state_dir / "logs" / f"peer-{spec.name}.log") as peer:
            await asyncio.to_thread(peer.wait_ready)
            with lab.progress.bar("peer", spec.jobs) as update:
                samples = await watch(peer, spec.jobs, RUN_SLACK_S + spec.jobs / MIN_RATE_PER_S, update)
            peak_rss_mb = peer.peak_rss_mb()
        after = await asyncio.to_thread(lab.triton_snapshot)
        with lab.progress.bar("read records", spec.jobs) as update:
            timings = await workload.read_timings(client, jobs, update)
    return run_figures(lab, spec, timings=timings, before=before, after=after, samples=samples, peak_rss_mb=peak_rss_mb)
