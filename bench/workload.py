"""The load: input images in GCS, jobs for the simulated GPU, publishing them, and reading their records back.

Inputs are a few deterministic photo-like JPEGs per size (``devstack.samples.sample_image``)
uploaded once; each job names one of them by URI and has its own ``job_id``, so
every job reads, infers and writes for real. Jobs are published either ahead of
the worker (a backlog) or paced at a fixed rate (open loop: the schedule does
not wait for results). Records are read back after a run, never during it, so
the reading does not load the stack being measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from bench.sim_model import MODEL_NAME
from devstack.samples import sample_image
from worker.client import JobClient, build_job
from worker.jobs import ImageJob, JobResult

#: Distinct input images per size: enough that caches do not flatter, few enough to upload quickly.
INPUT_VARIANTS = 8
#: Jobs published per gather: the publisher batches them; a bounded gather keeps its queue bounded.
PUBLISH_CHUNK = 250
#: Output buckets each run spreads its results over. fake-gcs-server's memory backend
#: (the stack's GCS emulator) spends CPU on every write in proportion to the objects
#: already in the bucket (measured: ~3 ms per job more per 1,000 objects), which
#: real GCS does not; 16 buckets per run keep that artefact under ~1 ms per job.
OUTPUT_BUCKETS_PER_RUN = 16
#: Records read back at once after a run.
READ_CONCURRENCY = 32


@dataclass(frozen=True)
class Inputs:
    """The input images of one size, encoded, and their URIs in the input bucket."""

    size: int
    images: tuple[bytes, ...]
    uris: tuple[str, ...]


def make_images(size: int, count: int = INPUT_VARIANTS) -> tuple[bytes, ...]:
    """``count`` deterministic ``size`` x ``size`` JPEGs."""
    return tuple(sample_image(size, size, seed=seed) for seed in range(count))


async def upload_inputs(client: JobClient, size: int, count: int = INPUT_VARIANTS) -> Inputs:
    images = await asyncio.to_thread(make_images, size, count)
    uris = [await client.upload_bytes(data, f"bench-{size}px-{i}.jpg") for i, data in enumerate(images)]
    return Inputs(size, images, tuple(uris))


def make_jobs(prefix: str, inputs: Inputs, count: int, output_buckets: Sequence[str] = ()) -> list[ImageJob]:
    """``count`` jobs for the simulated GPU, ids ``{prefix}-{i:05d}``, cycling through the inputs.

    With ``output_buckets``, job ``i`` writes to ``gs://{output_buckets[i % n]}/results``
    (see ``OUTPUT_BUCKETS_PER_RUN``); else to the worker's default output.
    """
    return [
        build_job(
            MODEL_NAME,
            input_uri=inputs.uris[i % len(inputs.uris)],
            job_id=f"{prefix}-{i:05d}",
            output_prefix=f"gs://{output_buckets[i % len(output_buckets)]}/results" if output_buckets else "",
        )
        for i in range(count)
    ]


async def publish_backlog(client: JobClient, jobs: Sequence[ImageJob], progress: Callable[[int], None]) -> None:
    """Publish every job as fast as the publisher batches them."""
    for start in range(0, len(jobs), PUBLISH_CHUNK):
        chunk = jobs[start : start + PUBLISH_CHUNK]
        await asyncio.gather(*(client.publish(job) for job in chunk))
        progress(len(chunk))


async def publish_paced(
    client: JobClient, jobs: Sequence[ImageJob], rate_per_s: float, progress: Callable[[int], None]
) -> None:
    """Publish one job every ``1 / rate_per_s`` seconds on a fixed schedule (open loop)."""
    started = time.monotonic()
    pending: list[asyncio.Future[str]] = []
    for i, job in enumerate(jobs):
        delay = started + i / rate_per_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.ensure_future(client.publish(job)))
        progress(1)
    await asyncio.gather(*pending)


@dataclass(frozen=True)
class JobTiming:
    """What a run needs from one result record."""

    job_id: str
    succeeded: bool
    finished_at: float  # epoch seconds: the record was written (the ack follows at once)
    latency_ms: float  # publish to record written, measured by the worker
    service_ms: float  # sum of the job's stage timings: pull to record written, less queueing inside the worker
    stages_ms: dict[str, float]

    @property
    def started_at(self) -> float:
        return self.finished_at - self.service_ms / 1000.0

    @classmethod
    def of(cls, result: JobResult) -> JobTiming:
        return cls(
            job_id=result.job_id,
            succeeded=result.status == JobResult.SUCCEEDED,
            finished_at=datetime.fromisoformat(result.finished_at).timestamp() if result.finished_at else 0.0,
            latency_ms=result.latency_ms,
            service_ms=sum(result.timings_ms.values()),
            stages_ms=dict(result.timings_ms),
        )


async def read_timings(
    client: JobClient, jobs: Sequence[ImageJob], progress: Callable[[int], None] = lambda _: None
) -> list[JobTiming]:
    """The records of ``jobs`` (every one must exist: call after the worker reported them done)."""
    gate = asyncio.Semaphore(READ_CONCURRENCY)

    async def one(job: ImageJob) -> JobTiming:
        async with gate:
            result = await client.wait(job, timeout_s=60)
        progress(1)
        return JobTiming.of(result)

    return list(await asyncio.gather(*(one(job) for job in jobs)))
