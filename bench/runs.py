"""Runs of the product worker on the stack: a backlog drained, or a paced load, reduced to figures.

A ``Lab`` is the started stack plus what every run needs: a fresh topic and
subscription per run (so no run sees another's messages), the worker's
environment, Triton's counters. ``backlog_run`` publishes all jobs first, then
starts the worker and samples it until the last job is done; ``paced_run``
starts the worker, waits until it is ready, then publishes at a fixed rate.
Both read every result record afterwards.

Timing sources: throughput runs from the first job's start (its record's
finish time less its stage timings, i.e. its pull) to the last record written
(the ack follows at once); latency is the record's ``latency_ms`` (publish to
record written); ``service_ms`` is the sum of a job's stage timings (pull to
record written); ``waiting_ms`` is the first less the second, job by job
(publish to pull: on a quiet system, Pub/Sub's delivery). CPU per job is the
worker's CPU time when its last job is done, less its CPU time just before it
took its first message (its start-up; ``sampling.baseline_sample``, or
failing that an idle worker's, ``Lab.measure_startup``), over the jobs; the slope of CPU time against jobs
done between 10 % and 90 % of the run is kept beside it as a cross-check, and the same difference per
thread group (event loop, image pool, native threads) says where it went. The
CPU the stack's components (Pub/Sub emulator, GCS emulator, Triton and its
stubs) spend during the run is divided by the jobs too: on a small machine
they share the worker's cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench import procstat, stats, workload
from bench.progress import Progress
from bench.sampling import Sample, baseline_sample, watch
from bench.sim_model import MODEL_NAME
from devstack.probe import free_port
from devstack.stack import Stack
from devstack.worker_process import WorkerFailed, WorkerProcess
from worker.client import JobClient
from worker.config import Settings
from worker.jobs import ImageJob

#: Slowest rate assumed when bounding how long a run may take, in jobs per second.
MIN_RATE_PER_S = 2.0
#: Seconds added to every run's time bound (worker start-up, the stack's first requests).
RUN_SLACK_S = 120.0
#: Seconds an idle worker is left after it reports ready before its start-up CPU is read.
STARTUP_SETTLE_S = 1.0
#: Idle workers started to measure start-up CPU (the least is kept).
STARTUP_TRIES = 2


@dataclass(frozen=True)
class RunSpec:
    """One run: a name (topic and job-id prefix), how many jobs of which size, and worker settings."""

    name: str
    jobs: int
    size: int
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TritonSnapshot:
    """Triton's counters of the model, and the CPU seconds of each stack component, at one moment."""

    counts: stats.TritonCounts
    histogram: dict[int, int]
    component_cpu_s: dict[str, float]


@dataclass(frozen=True)
class RunFigures:
    """What one run measured."""

    name: str
    jobs: int
    size: int
    env: dict[str, str]
    failed: int
    wall_s: float
    jobs_per_s: float
    cpu_ms_per_job: float | None
    cpu_ms_per_job_steady: float | None
    peak_rss_mb: float
    latency_ms: dict[str, float] | None
    service_ms: dict[str, float] | None
    waiting_ms: dict[str, float] | None  # publish to pull: latency less service, job by job
    redelivered: int  # copies of finished jobs the worker was handed again (the emulator's churn)
    avg_batch: float | None
    batch_histogram: dict[int, int]
    stages_ms: dict[str, float]  # mean per stage
    stack_cpu_ms_per_job: dict[str, float]  # per stack component, during the run
    rate_per_s: float | None = None  # paced runs: the offered rate
    thread_cpu_ms_per_job: dict[str, float] = field(default_factory=dict)  # by procstat.THREAD_GROUPS
    triton_ms: dict[str, float] = field(default_factory=dict)  # per request: in Triton, queued, computing
    event_loop_share: dict[str, float] = field(default_factory=dict)  # of the run's time: running, waiting for a CPU

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "jobs": self.jobs,
            "image_px": self.size,
            "env": self.env,
            "failed": self.failed,
            "wall_s": round(self.wall_s, 2),
            "jobs_per_s": round(self.jobs_per_s, 2),
            "cpu_ms_per_job": _round(self.cpu_ms_per_job, 3),
            "cpu_ms_per_job_steady": _round(self.cpu_ms_per_job_steady, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "latency_ms": self.latency_ms,
            "service_ms": self.service_ms,
            "waiting_ms": self.waiting_ms,
            "redelivered": self.redelivered,
            "avg_batch_size": self.avg_batch,
            "batch_histogram": {str(k): v for k, v in self.batch_histogram.items()},
            "stages_ms": self.stages_ms,
            "stack_cpu_ms_per_job": self.stack_cpu_ms_per_job,
            "rate_per_s": self.rate_per_s,
            "thread_cpu_ms_per_job": self.thread_cpu_ms_per_job,
            "triton_ms": self.triton_ms,
            "event_loop_share": self.event_loop_share,
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class Lab:
    """The started stack and the helpers every run shares."""

    def __init__(self, stack: Stack, state_dir: Path, progress: Progress) -> None:
        self.stack = stack
        self.state_dir = state_dir
        self.progress = progress
        self._inputs: dict[int, workload.Inputs] = {}
        #: CPU seconds of an idle worker from exec to ready (and settled); see ``measure_startup``.
        self.startup_cpu_s: float | None = None
        self.startup_s: float | None = None

    def settings(self, name: str, **overrides: Any) -> Settings:
        """Settings with the run's own topic, subscription and output buckets, created on the emulators."""
        buckets = tuple(f"bench-{name}-{k}" for k in range(workload.OUTPUT_BUCKETS_PER_RUN))
        values: dict[str, Any] = {
            "topic": f"bench-{name}",
            "subscription": f"bench-{name}-worker",
            "output_bucket": buckets[0],
            "allowed_output_buckets": buckets,
            "triton_url": self.stack.triton.grpc_url,
            "http_port": free_port(),
            "log_format": "json",
            **overrides,
        }
        settings = Settings(**values)
        self.stack.provision(settings)
        for bucket in settings.allowed_output_buckets:
            self.stack.create_bucket(settings, bucket)
        return settings

    def worker(self, settings: Settings, name: str, env: Mapping[str, str]) -> WorkerProcess:
        variables = {
            **self.stack.environment(settings),
            "TRITONQ_HTTP_PORT": str(settings.http_port),
            "TRITONQ_LOG_FORMAT": "json",
            "TRITONQ_ALLOWED_OUTPUT_BUCKETS": ",".join(settings.allowed_output_buckets),
            **env,
        }
        return WorkerProcess(variables, self.state_dir / "logs" / f"worker-{name}.log", http_port=settings.http_port)

    async def inputs(self, client: JobClient, size: int) -> workload.Inputs:
        if size not in self._inputs:
            self._inputs[size] = await workload.upload_inputs(client, size)
        return self._inputs[size]

    async def measure_startup(self, tries: int = STARTUP_TRIES) -> tuple[float, float]:
        """Start idle workers on an empty subscription: seconds to ready, and CPU seconds once settled.

        The least of ``tries``: the first start may compile ``.pyc`` files that later starts only load.
        """
        settings = self.settings("startup")
        measured: list[tuple[float, float]] = []
        for _ in range(tries):
            with self.worker(settings, "startup", {}) as worker:
                started = time.monotonic()
                await asyncio.to_thread(worker.wait_ready)
                ready_s = time.monotonic() - started
                await asyncio.sleep(STARTUP_SETTLE_S)
                measured.append((ready_s, procstat.cpu_seconds(worker.pid)))
        self.startup_s, self.startup_cpu_s = min(measured, key=lambda m: m[1])
        return self.startup_s, self.startup_cpu_s

    def triton_snapshot(self) -> TritonSnapshot:
        triton = self.stack.triton
        with urllib.request.urlopen(triton.metrics_url, timeout=10) as response:
            counts = stats.TritonCounts.parse(response.read().decode(), MODEL_NAME)
        with urllib.request.urlopen(f"{triton.http_url}/v2/models/{MODEL_NAME}/stats", timeout=10) as response:
            histogram = stats.batch_histogram(json.loads(response.read()))
        components = (self.stack.pubsub, self.stack.gcs, self.stack.triton)
        cpu = {c.name: procstat.group_cpu_seconds(c.proc.pid) for c in components if c.proc is not None}
        return TritonSnapshot(counts, histogram, cpu)


@contextlib.contextmanager
def started_lab(state_dir: Path, repository: Path, progress: Progress) -> Iterator[Lab]:
    """Start the stack on ``repository`` and yield its ``Lab``, inside the stack's environment.

    The default ``Settings`` are provisioned and exported (``Settings()`` inside
    the block reads the stack's endpoints); the stack stops when the block ends,
    however it ends.
    """
    stack = Stack(state_dir=state_dir, model_repository=repository)
    try:
        stack.start(progress=progress.note)
        base = Settings()
        stack.provision(base)
        with stack.environ(base):
            yield Lab(stack, state_dir, progress)
    finally:
        progress.note("stopping the stack")
        stack.stop()


class Attached(Protocol):
    """Something attached to the worker for a run (a profiler), stopped when the run ends."""

    def stop(self) -> None: ...


def _time_bound_s(jobs: int) -> float:
    return RUN_SLACK_S + jobs / MIN_RATE_PER_S


async def publish_backlog(lab: Lab, spec: RunSpec, settings: Settings, client: JobClient) -> list[ImageJob]:
    """Upload the run's inputs and publish its ``spec.jobs`` jobs ahead, as a backlog; returns the jobs."""
    inputs = await lab.inputs(client, spec.size)
    jobs = workload.make_jobs(spec.name, inputs, spec.jobs, settings.allowed_output_buckets)
    with lab.progress.bar("publish", spec.jobs) as update:
        await workload.publish_backlog(client, jobs, update)
    return jobs


async def backlog_run(lab: Lab, spec: RunSpec, attach: Callable[[int], Attached] | None = None) -> RunFigures:
    """Publish ``spec.jobs`` jobs, then start the worker and let it drain them.

    ``attach``, if given, is called with the worker's pid as soon as it runs
    (e.g. to start a profiler) and what it returns is stopped when the run ends.
    """
    settings = lab.settings(spec.name)
    async with JobClient(settings) as client:
        jobs = await publish_backlog(lab, spec, settings, client)
        before = await asyncio.to_thread(lab.triton_snapshot)
        with lab.worker(settings, spec.name, spec.env) as worker:
            profiler = None
            if attach is not None:
                # Attach once the interpreter serves its metrics: fully started, not yet pulling.
                await asyncio.to_thread(worker.wait_metrics)
                profiler = attach(worker.pid)
            try:
                with lab.progress.bar("worker", spec.jobs) as update:
                    samples = await watch(worker, spec.jobs, _time_bound_s(spec.jobs), update)
            finally:
                if profiler is not None:
                    profiler.stop()
            peak_rss_mb = worker.peak_rss_bytes() / 2**20
        after = await asyncio.to_thread(lab.triton_snapshot)
        with lab.progress.bar("read records", spec.jobs) as update:
            timings = await workload.read_timings(client, jobs, update)
    return run_figures(lab, spec, timings=timings, before=before, after=after, samples=samples, peak_rss_mb=peak_rss_mb)


async def paced_run(lab: Lab, spec: RunSpec, rate_per_s: float) -> RunFigures:
    """Start the worker, wait until it is ready, then publish ``spec.jobs`` jobs at ``rate_per_s``."""
    settings = lab.settings(spec.name)
    async with JobClient(settings) as client:
        inputs = await lab.inputs(client, spec.size)
        jobs = workload.make_jobs(spec.name, inputs, spec.jobs, settings.allowed_output_buckets)
        with lab.worker(settings, spec.name, spec.env) as worker:
            await asyncio.to_thread(worker.wait_ready)
            before = await asyncio.to_thread(lab.triton_snapshot)
            with lab.progress.bar(f"publish at {rate_per_s:g}/s", spec.jobs) as update:
                await workload.publish_paced(client, jobs, rate_per_s, update)
            samples = await watch(worker, spec.jobs, _time_bound_s(spec.jobs), lambda _: None)
            peak_rss_mb = worker.peak_rss_bytes() / 2**20
        after = await asyncio.to_thread(lab.triton_snapshot)
        with lab.progress.bar("read records", spec.jobs) as update:
            timings = await workload.read_timings(client, jobs, update)
    figures = run_figures(
        lab, spec, timings=timings, before=before, after=after, samples=samples, peak_rss_mb=peak_rss_mb
    )
    return dataclasses.replace(figures, rate_per_s=rate_per_s)


def run_figures(
    lab: Lab,
    spec: RunSpec,
    *,
    timings: list[workload.JobTiming],
    before: TritonSnapshot,
    after: TritonSnapshot,
    samples: Sequence[Sample],
    peak_rss_mb: float,
) -> RunFigures:
    """A run's figures from its records, the worker's samples and Triton's counters before and after."""
    done = [t for t in timings if t.succeeded]
    if not done:
        raise WorkerFailed(f"{spec.name}: no job succeeded")
    wall_s = max(t.finished_at for t in done) - min(t.started_at for t in done)
    steady = stats.steady_rate([(s.done, s.cpu_s) for s in samples], spec.jobs)
    first = baseline_sample(samples)
    baseline = lab.startup_cpu_s if first is None else first.cpu_s
    cpu_ms_per_job = None
    if baseline is not None and samples:
        cpu_ms_per_job = (samples[-1].cpu_s - baseline) * 1000 / spec.jobs
    thread_cpu_ms_per_job, loop_share = {}, {}
    if first is not None and samples:
        thread_cpu_ms_per_job = _ms_per_job(samples[-1].threads_cpu_s, first.threads_cpu_s, spec.jobs)
        loop_share = _loop_share(first, samples[-1])
    stages = sorted({name for t in done for name in t.stages_ms})
    return RunFigures(
        name=spec.name,
        jobs=spec.jobs,
        size=spec.size,
        env=dict(spec.env),
        failed=len(timings) - len(done),
        wall_s=wall_s,
        jobs_per_s=len(done) / wall_s,
        cpu_ms_per_job=cpu_ms_per_job,
        cpu_ms_per_job_steady=None if steady is None else steady * 1000,
        peak_rss_mb=peak_rss_mb,
        latency_ms=stats.summarize([t.latency_ms for t in done]),
        service_ms=stats.summarize([t.service_ms for t in done]),
        waiting_ms=stats.summarize([t.latency_ms - t.service_ms for t in done]),
        redelivered=int(samples[-1].redelivered) if samples else 0,
        avg_batch=(after.counts - before.counts).avg_batch,
        batch_histogram=stats.histogram_delta(after.histogram, before.histogram),
        stages_ms={name: round(sum(t.stages_ms.get(name, 0.0) for t in done) / len(done), 3) for name in stages},
        stack_cpu_ms_per_job=_ms_per_job(after.component_cpu_s, before.component_cpu_s, spec.jobs),
        thread_cpu_ms_per_job=thread_cpu_ms_per_job,
        triton_ms=(after.counts - before.counts).mean_ms(),
        event_loop_share=loop_share,
    )


def _loop_share(first: Sample, last: Sample) -> dict[str, float]:
    """The share of the time between two samples the main thread ran, and waited runnable for a CPU."""
    elapsed = last.at - first.at
    if elapsed <= 0 or last.loop_sched_s == (0.0, 0.0):
        return {}
    (run0, wait0), (run1, wait1) = first.loop_sched_s, last.loop_sched_s
    return {"running": round((run1 - run0) / elapsed, 3), "waiting_for_cpu": round((wait1 - wait0) / elapsed, 3)}


def _ms_per_job(after: Mapping[str, float], before: Mapping[str, float], jobs: int) -> dict[str, float]:
    """CPU milliseconds per job of each named counter between two readings (seconds)."""
    return {name: round((cpu_s - before.get(name, 0.0)) * 1000 / jobs, 3) for name, cpu_s in after.items()}
