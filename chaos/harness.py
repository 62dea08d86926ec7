"""The chaos harness: one scenario's topic, buckets, jobs and worker processes, and what became of its messages.

A ``Run`` owns a fresh topic and subscription (with the project's dead-letter
policy) and fresh output buckets with object versioning on, publishes good
jobs and bad messages (``bad_messages.py``), starts ``tritonq run`` as child
processes (``devstack.worker_process``) and reads the outcome back from GCS,
never from the worker (``accounting.py``): a job succeeded when its record
says so, a bad message is accounted for when its error record exists or it
reached the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from chaos import bad_messages
from chaos.accounting import Report, Snapshot
from chaos.bad_messages import BAD_KINDS, BadMessage
from chaos.limits import MemoryLimit
from devstack.samples import sample_image
from devstack.stack import Stack
from devstack.worker_process import WorkerProcess
from worker.client import JobClient, build_job
from worker.config import Settings
from worker.jobs import ImageJob

#: The model every good job runs: a Python-backend model with two versions, cheap at this size.
MODEL = "enhance"
#: Input images are small so the CPU goes to the worker's logic, not to pixels.
IMAGE_SIZE = (64, 64)
#: Distinct input images the good jobs share (different seeds, so outputs differ).
DISTINCT_INPUTS = 4
#: Output buckets per scenario, taken in turn: the largest backlog then leaves about 1,000
#: objects in each, where the versioning emulator still uploads at its fresh-bucket speed.
OUTPUT_BUCKETS = 10
#: Seconds between looks at the output bucket while waiting for progress.
POLL_S = 0.25
#: Inline payload cap the scenarios run the worker with, so the over-cap message stays small.
MAX_INLINE_BYTES = 64 * 1024
#: Good jobs write under this prefix, the one the worker also uses for jobs that name no output.
RESULTS_PREFIX = "results"
#: Seconds a dead-letter pull waits for messages before concluding there are none.
DEAD_LETTER_PULL_S = 3.0


class Run:
    """One scenario's world: its own topic, subscription, dead-letter topic and versioned output buckets.

    Good jobs take the output buckets in turn: the emulator's versioning
    (memory) backend slows with every object a bucket holds, so no bucket is
    let to hold more than a few thousand.
    """

    def __init__(
        self,
        stack: Stack,
        name: str,
        workdir: Path,
        *,
        storage_url: str | None = None,
        triton_url: str | None = None,
        dead_letter: bool = True,
        image_size: tuple[int, int] = IMAGE_SIZE,
        memory_limit_bytes: int | None = None,
        cpus: int | None = None,
        **overrides: Any,
    ) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.output_buckets = tuple(f"chaos-{suffix}-{k}" for k in range(OUTPUT_BUCKETS))
        self.stack = stack
        self.name = name
        self.image_size = image_size
        self.memory = MemoryLimit(memory_limit_bytes) if memory_limit_bytes is not None else None
        self.cpus = cpus
        self.dead_letter = dead_letter
        self.workdir = workdir
        values: dict[str, Any] = {
            "topic": f"chaos-{name}-{suffix}",
            "subscription": f"chaos-{name}-{suffix}-worker",
            "output_bucket": self.output_buckets[0],
            "allowed_output_buckets": ",".join(self.output_buckets),
            "triton_url": triton_url or stack.triton.grpc_url,
            "max_inline_bytes": MAX_INLINE_BYTES,
            "log_format": "json",
        }
        values.update(overrides)
        self.overrides = values
        self.settings = Settings(**values)
        self.gcs_url = stack.gcs.url
        self.storage_url = storage_url or stack.gcs.url
        self.good: list[ImageJob] = []
        self.bad: list[BadMessage] = []
        self.started = time.monotonic()
        self.workers: list[WorkerProcess] = []

    # -- setup ------------------------------------------------------------------------------------

    async def publish_good(self, jobs: int, seed: int) -> None:
        """Set the run up and publish ``jobs`` good jobs, in an order shuffled by ``seed``."""
        await self.setup()
        async with self.client() as client:
            good = self.good_jobs(jobs, await self.inputs(client))
            await self.publish(client, good, [], seed=seed)

    async def setup(self) -> None:
        await asyncio.to_thread(self.stack.provision_pubsub, self.settings, dead_letter=self.dead_letter)
        buckets = [(self.settings.input_bucket, False), *((b, True) for b in self.output_buckets)]
        for bucket, versioned in buckets:
            await asyncio.to_thread(self.stack.create_bucket, self.settings, bucket, versioned=versioned)
        self.started = time.monotonic()

    def worker_env(self, **extra: str) -> dict[str, str]:
        """The environment of ``tritonq run`` for this scenario: the stack's, and every setting the scenario chose."""
        env = self.stack.environment(self.settings)
        for key, value in self.overrides.items():
            env[f"TRITONQ_{key.upper()}"] = str(value)
        env["STORAGE_EMULATOR_HOST"] = self.storage_url
        env.update(extra)
        return env

    def _confine(self, pid: int) -> None:
        """Put a new worker under the run's limits at once, before its first job and its thread pool's sizing."""
        if self.memory is not None:
            self.memory.add(pid)
        if self.cpus is not None:
            # As a container's CPU limit would: the worker sizes its image threads from its affinity.
            os.sched_setaffinity(pid, sorted(os.sched_getaffinity(0))[: self.cpus])

    def worker(self, label: str = "worker", **extra: str) -> WorkerProcess:
        log = self.workdir / f"{self.name}-{label}.log"
        worker = WorkerProcess(self.worker_env(**extra), log, on_spawn=self._confine)
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.kill()
        if self.memory is not None:
            self.memory.close()

    # -- publishing -------------------------------------------------------------------------------

    async def inputs(self, client: JobClient) -> list[str]:
        return [
            await client.upload_bytes(sample_image(*self.image_size, seed=seed), f"chaos/{self.name}-{seed}.jpg")
            for seed in range(DISTINCT_INPUTS)
        ]

    def good_jobs(self, count: int, uris: list[str], *, inline: bool = False) -> list[ImageJob]:
        """``count`` more good jobs: versions 1, 2 and routed in turn; inline payloads or shared inputs."""
        jobs = []
        for i in range(len(self.good), len(self.good) + count):
            options: dict[str, Any] = {
                "job_id": f"{self.name}-{i:05d}",
                "version": ("1", "2", "")[i % 3],
                "output_prefix": f"gs://{self.output_buckets[i % OUTPUT_BUCKETS]}/{RESULTS_PREFIX}",
            }
            if inline:
                options["input_bytes"] = sample_image(*self.image_size, seed=i % DISTINCT_INPUTS)
            else:
                options["input_uri"] = uris[i % len(uris)]
            jobs.append(build_job(MODEL, **options))
        self.good.extend(jobs)
        return jobs

    async def bad_messages(
        self, client: JobClient, count: int, uris: list[str], taken: list[ImageJob] | None = None
    ) -> list[BadMessage]:
        """``count`` bad messages for this run (``chaos.bad_messages.build``)."""
        return await bad_messages.build(client, self.settings, self.name, count, uris, taken=taken, model=MODEL)

    async def publish(self, client: JobClient, good: list[ImageJob], bad: list[BadMessage], seed: int = 0) -> None:
        """Publish good and bad in a shuffled order (bad messages land between good ones)."""
        order: list[ImageJob | BadMessage] = [*good, *bad]
        random.Random(seed).shuffle(order)

        async def one(item: ImageJob | BadMessage) -> BadMessage | None:
            if isinstance(item, BadMessage):
                message_id = await client.publish_raw(item.data, item.attributes)
                return BadMessage(item.kind, item.data, item.attributes, item.job_id, message_id)
            await client.publish(item)
            return None

        published = await asyncio.gather(*(one(item) for item in order))
        self.bad.extend(b for b in published if b is not None)

    def client(self) -> JobClient:
        return JobClient(self.settings)

    # -- observing --------------------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        """Every generation of every object in the output buckets (``versions=true``), by object name."""
        generations: dict[str, list[dict[str, Any]]] = {}
        async with aiohttp.ClientSession() as session:
            for bucket in self.output_buckets:
                url = f"{self.gcs_url}/storage/v1/b/{bucket}/o"
                params = {"versions": "true", "maxResults": "5000"}
                while True:
                    async with session.get(url, params=params) as response:
                        response.raise_for_status()
                        page = await response.json()
                    for item in page.get("items", []):
                        generations.setdefault(item["name"], []).append(item)
                    token = page.get("nextPageToken")
                    if not token:
                        break
                    params["pageToken"] = token
        for versions in generations.values():
            versions.sort(key=lambda item: int(item.get("generation", 0)))
        return Snapshot(generations, RESULTS_PREFIX)

    def bad_key(self, bad: BadMessage) -> str:
        return bad.job_id if bad.job_id is not None else f"_invalid/{bad.message_id}"

    async def succeeded(self) -> int:
        snapshot = await self.snapshot()
        return sum(1 for job in self.good if snapshot.succeeded(job.job_id))

    def settled(self, snapshot: Snapshot) -> bool:
        return all(snapshot.succeeded(job.job_id) for job in self.good) and all(
            snapshot.failed(self.bad_key(bad)) for bad in self.bad
        )

    async def wait_for(
        self, check: Callable[[Snapshot], bool], what: str, timeout_s: float, *, alive: WorkerProcess | None = None
    ) -> Snapshot:
        """Poll the bucket until ``check`` holds; ``TimeoutError`` at the deadline (no sleeping as a guess)."""
        deadline = time.monotonic() + timeout_s
        while True:
            snapshot = await self.snapshot()
            if check(snapshot):
                return snapshot
            if alive is not None:
                alive.peak_rss_bytes()
                if not alive.running:
                    raise RuntimeError(f"{self.name}: worker exited while waiting for {what}:\n{alive.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {what} not reached after {timeout_s:.0f} s")
            await asyncio.sleep(POLL_S)

    async def wait_progress(self, count: int, timeout_s: float, alive: WorkerProcess | None = None) -> Snapshot:
        return await self.wait_for(
            lambda s: sum(1 for job in self.good if s.succeeded(job.job_id)) >= count,
            f"{count} jobs succeeded",
            timeout_s,
            alive=alive,
        )

    async def settle(self, timeout_s: float, alive: WorkerProcess | None = None) -> Snapshot | None:
        """Wait until every good job succeeded and every bad message has its error record; ``None`` at the deadline.

        Not settling is a result, not an error: what is missing is reported as lost.
        """
        try:
            return await self.wait_for(self.settled, "every job accounted for", timeout_s, alive=alive)
        except TimeoutError:
            return None

    def dead_letters(self) -> list[bytes]:
        """Pull (and ack) everything in the dead-letter subscription; returns the message bodies."""
        from google.api_core.exceptions import DeadlineExceeded
        from google.cloud import pubsub_v1

        bodies: list[bytes] = []
        path = f"projects/{self.settings.project}/subscriptions/{self.settings.dead_letter_topic}"
        subscriber = pubsub_v1.SubscriberClient()
        try:
            while True:
                try:
                    response = subscriber.pull(
                        request={"subscription": path, "max_messages": 1000}, timeout=DEAD_LETTER_PULL_S
                    )
                except DeadlineExceeded:
                    break
                if not response.received_messages:
                    break
                bodies.extend(m.message.data for m in response.received_messages)
                subscriber.acknowledge(
                    request={"subscription": path, "ack_ids": [m.ack_id for m in response.received_messages]}
                )
        finally:
            subscriber.close()
        return bodies

    async def report(self, **notes: Any) -> Report:
        """Account for every message published: from the bucket's generations and the dead-letter topic."""
        seconds = time.monotonic() - self.started
        snapshot = await self.snapshot()
        dead = await asyncio.to_thread(self.dead_letters)
        dead_set = set(dead)
        succeeded = [job for job in self.good if snapshot.succeeded(job.job_id)]
        # A good job is lost when it has no success record, whatever else happened to it (dead-lettered included).
        lost = [job.job_id for job in self.good if not snapshot.succeeded(job.job_id)]
        failed = [bad for bad in self.bad if snapshot.failed(self.bad_key(bad))]
        unaccounted = [bad for bad in self.bad if not snapshot.failed(self.bad_key(bad)) and bad.data not in dead_set]
        wrong_codes = {
            bad.kind: snapshot.error_code(self.bad_key(bad))
            for bad in failed
            if snapshot.error_code(self.bad_key(bad)) != BAD_KINDS[bad.kind]
        }
        sizes = [int((snapshot.record(self.bad_key(bad)) or {}).get("size", 0)) for bad in failed]
        if sizes:
            notes["largest_bad_record_bytes"] = max(sizes)
        duplicated = snapshot.duplicated()
        jobs_duplicated = {name.rsplit("/", 1)[-1].split(".", 1)[0] for name in duplicated}
        peak = max((w.peak_rss_bytes() for w in self.workers), default=0)
        if lost:
            notes["lost_jobs"] = lost[:20]
        if unaccounted:
            notes["bad_unaccounted"] = sorted({bad.kind for bad in unaccounted})
        if wrong_codes:
            notes["unexpected_error_codes"] = wrong_codes
        if duplicated:
            notes["duplicated_objects"] = duplicated[:20]
        notes["worker_starts"] = sum(w.starts for w in self.workers)
        if self.memory is not None:
            peak_limited = self.memory.peak_bytes()
            notes["memory_limit"] = self.memory.kind
            notes["memory_limit_peak_mb"] = round(peak_limited / 2**20, 1) if peak_limited else None
            notes["oom_kills"] = self.memory.oom_kills()
        return Report(
            scenario=self.name,
            published=len(self.good) + len(self.bad),
            succeeded=len(succeeded),
            failed_permanent=len(failed),
            lost=len(lost),
            duplicate_results=len(jobs_duplicated),
            seconds=round(seconds, 1),
            dead_lettered=len(dead),
            bad_unaccounted=len(unaccounted),
            peak_rss_mb=round(peak / 2**20, 1) if peak else None,
            notes=notes,
        )
