"""Sampling the product worker (``tritonq run``, a child process) while it works.

The worker runs as its own process (``devstack.worker_process``) as in a pod,
so its CPU time and peak memory (``bench.procstat``) are its own and not the
benchmark's. While it works, ``watch`` scrapes its ``/metrics`` once a
second for the jobs it has finished and reads its CPU time at the same moment:
the samples give steady-state CPU per job (start-up left out) and drive the
progress bar. A scrape costs the worker a few milliseconds of CPU (py-spy: 3 %
of its main thread when scraped four times a second), so no more often.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bench import procstat, stats
from devstack.worker_process import WorkerFailed, WorkerProcess

#: Seconds between scrapes of the worker's metrics while it works: one costs the worker a few ms of CPU
#: (every histogram rendered), so scraping as often as a progress bar would like inflates its CPU per job.
SAMPLE_INTERVAL_S = 1.0


#: Seconds between scrapes until the worker takes its first message: the CPU it has
#: spent by then is its start-up, the baseline of the run's CPU per job.
BASELINE_INTERVAL_S = 0.05
#: Seconds without a job finished (start-up included), while jobs remain, after which the run is abandoned.
STALL_S = 60.0


@dataclass(frozen=True)
class Sample:
    """One scrape: when, jobs finished so far, messages taken so far, nacks, the worker's CPU seconds."""

    at: float  # time.monotonic()
    done: float  # jobs finished for the first time
    busy: float  # messages held plus jobs in flight now
    nacked: float
    cpu_s: float
    redelivered: float = 0.0  # copies of jobs already finished, found done by their record and acked
    threads_cpu_s: Mapping[str, float] = field(default_factory=dict)  # cpu_s by procstat.THREAD_GROUPS
    loop_sched_s: tuple[float, float] = (0.0, 0.0)  # main thread: on a CPU, waiting for one (procstat)

    @classmethod
    def of(
        cls,
        metrics: str,
        *,
        at: float,
        cpu_s: float,
        threads_cpu_s: Mapping[str, float] | None = None,
        loop_sched_s: tuple[float, float] = (0.0, 0.0),
    ) -> Sample:
        """A sample from the text of the worker's ``/metrics``."""
        finished = stats.jobs_finished(metrics)
        return cls(
            at=at,
            done=sum(finished[outcome] for outcome in stats.FIRST_OUTCOMES),
            busy=stats.metric_sum(metrics, "tritonq_messages_held")
            + stats.metric_sum(metrics, "tritonq_jobs_in_flight"),
            nacked=stats.metric_sum(metrics, "tritonq_jobs_total", {"outcome": "nacked"}),
            cpu_s=cpu_s,
            redelivered=finished["duplicate"],
            threads_cpu_s=dict(threads_cpu_s or {}),
            loop_sched_s=loop_sched_s,
        )


def baseline_sample(samples: Sequence[Sample]) -> Sample | None:
    """The last sample before the worker held its first message (``None``: none was taken)."""
    baseline = None
    for sample in samples:
        if sample.busy or sample.done:
            return baseline
        baseline = sample
    return baseline


def sample_of(worker: WorkerProcess) -> Sample | None:
    """Jobs finished and CPU now; ``None`` while the metrics endpoint does not answer yet."""
    try:
        text = worker.metrics()
    except OSError:  # urllib's errors included
        return None
    return Sample.of(
        text,
        at=time.monotonic(),
        cpu_s=procstat.cpu_seconds(worker.pid),
        threads_cpu_s=procstat.thread_cpu_seconds(worker.pid),
        loop_sched_s=procstat.schedstat_seconds(worker.pid),
    )


async def watch(worker: WorkerProcess, total: int, timeout_s: float, progress: Callable[[int], None]) -> list[Sample]:
    """Sample the worker until it has finished ``total`` jobs.

    Scrapes quickly until the worker takes its first message (see ``baseline_sample``),
    then every ``SAMPLE_INTERVAL_S``. ``WorkerFailed`` if the worker dies, nacks
    as many jobs as there are, finishes none for ``STALL_S``, or runs out of time.
    """
    samples: list[Sample] = []
    deadline = time.monotonic() + timeout_s
    shown = 0
    progressed = time.monotonic()
    while True:
        if not worker.running:
            raise WorkerFailed(f"worker exited while it had jobs to do; see {worker.log_path}")
        sample = await asyncio.to_thread(sample_of, worker)
        now = time.monotonic()
        if sample is not None:
            samples.append(sample)
            if int(sample.done) > shown:
                progress(int(sample.done) - shown)
                shown, progressed = int(sample.done), now
            if sample.done >= total:
                return samples
            if sample.nacked >= total:
                raise WorkerFailed(f"worker nacked {sample.nacked:.0f} jobs; see {worker.log_path}")
        if now > deadline or now - progressed > STALL_S:
            raise WorkerFailed(f"worker finished {shown}/{total} jobs; see {worker.log_path}")
        taking = bool(samples) and (samples[-1].busy or samples[-1].done)
        await asyncio.sleep(SAMPLE_INTERVAL_S if taking else BASELINE_INTERVAL_S)
