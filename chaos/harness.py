"""The chaos harness: one scenario's topic, bucket, jobs, worker processes, and the accounting of what became of them.

A ``Run`` owns a fresh topic and subscription (with the project's dead-letter
policy) and a fresh output bucket with object versioning on, publishes good
jobs and bad messages, starts ``tritonq run`` as child processes
(``WorkerProcess``) and reads the outcome back from GCS, never from the
worker: a job succeeded when its record says so, a bad message is accounted
for when its error record exists or it reached the dead-letter topic.

Why versioning: results are written create-only (``ifGenerationMatch=0``), so
a second write of the same object must fail; with versioning on, a second
write that did succeed would leave a second generation behind, so counting the
generations of every object name is a proof of "written once", not a guess
from the logs. ``verify_duplicate_detection`` checks the emulator honours both
halves (an overwrite shows as two generations; a create-only rewrite fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp

from chaos.bad_inputs import scan_bomb, tiff_tile_bomb, webp_bomb
from chaos.limits import MemoryLimit
from worker.cli import spawn_worker
from worker.client import JobClient, build_job, encode_job
from worker.config import Settings
from worker.demo import sample_image
from worker.jobs import GcsRef, ImageJob
from worker.jobs import max_message_bytes as jobs_max_message_bytes
from worker.stack import Stack, free_port, provision_pubsub
from worker.storage import Storage

#: The model every good job runs: a Python-backend model with two versions, cheap at this size.
MODEL = "enhance"
#: Input images are small so the CPU goes to the worker's logic, not to pixels.
IMAGE_SIZE = (64, 64)
#: Distinct input images the good jobs share (different seeds, so outputs differ).
DISTINCT_INPUTS = 4
#: Output buckets per scenario, taken in turn: the largest backlog then leaves about 1,000
#: objects in each, where the versioning emulator still uploads at its fresh-bucket speed.
OUTPUT_BUCKETS = 10
#: Seconds a worker process gets to answer ``/readyz`` after it is spawned.
WORKER_READY_TIMEOUT_S = 120.0
#: Seconds between looks at the output bucket while waiting for progress.
POLL_S = 0.25
#: Inline payload cap the scenarios run the worker with, so the over-cap message stays small.
MAX_INLINE_BYTES = 64 * 1024
#: Good jobs write under this prefix, the one the worker also uses for jobs that name no output.
RESULTS_PREFIX = "results"
#: Seconds a dead-letter pull waits for messages before concluding there are none.
DEAD_LETTER_PULL_S = 3.0

#: Every kind of bad message, from broken ones to hostile ones, and the error code its record must
#: carry. A message that is no valid job (or another job under a taken id) is recorded under
#: ``_invalid/{message_id}``; a valid job that fails, under its id.
BAD_KINDS: dict[str, str] = {
    "not_json_or_protobuf": "invalid_message",
    "wrong_field_types": "invalid_message",
    "unknown_model": "unknown_model",
    "unknown_version": "unknown_version",
    "missing_input": "input_not_found",
    "not_an_image": "not_an_image",
    "truncated_jpeg": "corrupt_image",
    "huge_png": "too_large",
    "inline_over_cap": "too_large",
    "job_id_traversal": "invalid_job_id",
    "bucket_off_allowlist": "bucket_not_allowed",
    "empty_message": "invalid_message",
    # Taking over another job's result.
    "job_id_conflict": "job_id_conflict",
    "invalid_with_taken_id": "invalid_format",
    "record_named_like_a_result": "invalid_job_id",
    # Memory and CPU far past what the file's size suggests.
    "tiff_tile_bomb": "too_large",
    "webp_lossless_bomb": "too_large",
    "progressive_scan_bomb": "too_complex",
    # Params.
    "param_out_of_range": "invalid_param",
    "param_not_a_number": "invalid_param",
    "param_for_triton": "invalid_param",
    # Amplifiers: metric series, error texts, parsing time.
    "version_flood": "unknown_version",
    "huge_error_text": "invalid_format",
    "oversized_message": "too_large",
    "params_flood": "invalid_message",
    # Names GCS refuses.
    "job_id_newline": "invalid_job_id",
    "input_name_dotdot": "invalid_uri",
}
#: A forged W3C trace context, sent as a job param rather than as the message's attribute.
FORGED_TRACEPARENT = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"


@dataclass
class Report:
    """One line of ``build/chaos.json``."""

    scenario: str
    published: int
    succeeded: int
    failed_permanent: int
    lost: int
    duplicate_results: int
    seconds: float
    dead_lettered: int = 0
    bad_unaccounted: int = 0
    peak_rss_mb: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BadMessage:
    """A message the worker must refuse: where its error record must appear, and with which code."""

    kind: str
    data: bytes
    attributes: Mapping[str, str]
    job_id: str | None  # None: no readable job_id, the record is keyed by message id
    message_id: str = ""


@dataclass
class Snapshot:
    """What the output bucket holds: every generation of every object, and the records by job."""

    generations: dict[str, list[dict[str, Any]]]
    prefix: str

    def record(self, key: str) -> dict[str, Any] | None:
        """The newest metadata of ``{prefix}/{key}.json`` (key: a job_id or ``_invalid/{message_id}``)."""
        versions = self.generations.get(f"{self.prefix}/{key}.json")
        return versions[-1] if versions else None

    def succeeded(self, job_id: str) -> bool:
        record = self.record(job_id)
        return record is not None and "error_code" not in record.get("metadata", {})

    def failed(self, key: str) -> bool:
        record = self.record(key)
        return record is not None and "error_code" in record.get("metadata", {})

    def error_code(self, key: str) -> str:
        record = self.record(key)
        return str(record.get("metadata", {}).get("error_code", "")) if record else ""

    def duplicated(self) -> list[str]:
        """Object names written more than once (more than one generation ever existed)."""
        return sorted(name for name, versions in self.generations.items() if len(versions) > 1)


class WorkerProcess:
    """``tritonq run`` as a child process, as it runs in a pod; ``stop_hard()`` in a ``finally`` always."""

    def __init__(
        self, env: Mapping[str, str], log_path: Path, memory: MemoryLimit | None = None, cpus: int | None = None
    ) -> None:
        self.port = free_port()
        #: The memory limit the process runs under, as a container's would bound it.
        self.memory = memory
        #: CPUs the process may run on, as a container's CPU limit bounds them (and so its image threads).
        self.cpus = cpus
        self.env = {**env, "TRITONQ_HTTP_PORT": str(self.port)}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        #: The largest ``VmHWM`` (peak resident set) seen, in bytes, over this process's lives.
        self.peak_rss_bytes = 0
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("worker already running")
        self.proc = spawn_worker(self.env, self.log_path)
        if self.memory is not None:
            # At once, while the interpreter is still importing: the limit holds before the first job.
            self.memory.add(self.proc.pid)
        if self.cpus is not None:
            # Also at once: the worker sizes its thread pool from its affinity once imports are done.
            os.sched_setaffinity(self.proc.pid, sorted(os.sched_getaffinity(0))[: self.cpus])
        self.starts += 1

    async def wait_ready(self, timeout_s: float = WORKER_READY_TIMEOUT_S) -> None:
        url = f"http://127.0.0.1:{self.port}/readyz"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"worker exited before it was ready; see {self.log_path}")
            if await asyncio.to_thread(_http_ok, url):
                return
            await asyncio.sleep(POLL_S)
        raise TimeoutError(f"worker not ready after {timeout_s:.0f} s; see {self.log_path}")

    def sample_rss(self) -> int:
        """Read the process's peak RSS (``VmHWM``) while it lives; returns the peak so far."""
        if self.proc is not None:
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_rss_bytes = max(self.peak_rss_bytes, int(line.split()[1]) * 1024)
        return self.peak_rss_bytes

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a node loss would; no shutdown code runs."""
        assert self.proc is not None
        self.sample_rss()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    async def terminate(self, timeout_s: float) -> tuple[int, float]:
        """SIGTERM, as Kubernetes sends it; returns the exit status and the seconds the exit took."""
        assert self.proc is not None
        self.sample_rss()
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9, time.monotonic() - started
        return code, time.monotonic() - started

    async def wait_exit(self, timeout_s: float) -> tuple[int | None, float]:
        """Wait for the process to exit on its own; returns its status (``None`` if it still ran) and the wait."""
        assert self.proc is not None
        started = time.monotonic()
        try:
            code = await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - started
        return code, time.monotonic() - started

    def stop_hard(self) -> None:
        """Make sure nothing is left running (the cleanup of a failed scenario)."""
        if self.running:
            self.kill()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def log_lines(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


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
        await asyncio.to_thread(provision_pubsub, self.settings, self.stack.pubsub.host, dead_letter=self.dead_letter)
        async with aiohttp.ClientSession() as session:
            buckets = [(self.settings.input_bucket, False), *((b, True) for b in self.output_buckets)]
            for bucket, versioned in buckets:
                body = {"name": bucket, "versioning": {"enabled": versioned}}
                url = f"{self.gcs_url}/storage/v1/b?project={self.settings.project}"
                async with session.post(url, json=body) as response:
                    if response.status not in (200, 409):
                        raise RuntimeError(f"creating bucket {bucket}: HTTP {response.status}")
        self.started = time.monotonic()

    def worker_env(self, **extra: str) -> dict[str, str]:
        """The environment of ``tritonq run`` for this scenario: the stack's, and every setting the scenario chose."""
        env = self.stack.environment(self.settings)
        for key, value in self.overrides.items():
            env[f"TRITONQ_{key.upper()}"] = str(value)
        env["STORAGE_EMULATOR_HOST"] = self.storage_url
        env.update(extra)
        return env

    def worker(self, label: str = "worker", **extra: str) -> WorkerProcess:
        log = self.workdir / f"{self.name}-{label}.log"
        worker = WorkerProcess(self.worker_env(**extra), log, self.memory, self.cpus)
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop_hard()
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
        """``count`` bad messages, every kind in ``BAD_KINDS`` in turn; ``taken``: finished good jobs whose ids
        the takeover kinds reuse (without them, those kinds reuse ids of their own)."""
        bucket = self.settings.input_bucket
        not_image = await client.upload_bytes(b"this is plain text, not an image", f"chaos/{self.name}-text.jpg")
        whole = sample_image(*IMAGE_SIZE, seed=99)
        truncated = await client.upload_bytes(whole[: len(whole) // 2], f"chaos/{self.name}-truncated.jpg")
        huge = await client.upload_bytes(huge_png(), f"chaos/{self.name}-huge.png", "image/png")
        tiff = await client.upload_bytes(tiff_tile_bomb(), f"chaos/{self.name}-tile.tif", "image/tiff")
        webp = await client.upload_bytes(webp_bomb(), f"chaos/{self.name}-lossless.webp", "image/webp")
        scans = await client.upload_bytes(scan_bomb(), f"chaos/{self.name}-scans.jpg")
        limit = jobs_max_message_bytes(self.settings.max_inline_bytes)
        kinds = list(BAD_KINDS)
        made: list[BadMessage] = []
        for i in range(count):
            kind = kinds[i % len(kinds)]
            job_id = f"{self.name}-bad-{kind}-{i:04d}"
            victim = taken[i % len(taken)] if taken else build_job(MODEL, input_uri=uris[0], job_id=job_id)

            def job(model: str = MODEL, **options: Any) -> tuple[bytes, str | None]:
                built = build_job(model, job_id=job_id, **options)  # noqa: B023 - used at once
                return encode_job(built), built.job_id

            def invalid(model: str = MODEL, **options: Any) -> tuple[bytes, str | None]:
                return encode_job(build_job(model, **{"job_id": job_id, **options})), None  # noqa: B023

            attributes: dict[str, str] = {}
            readable: str | None
            if kind == "not_json_or_protobuf":
                data, readable = f"this is not a job #{i}".encode(), None
            elif kind == "wrong_field_types":
                data, readable = json.dumps({"jobId": job_id, "model": 42, "params": [1, 2]}).encode(), None
            elif kind == "unknown_model":
                data, readable = job("no_such_model", input_uri=uris[0])
            elif kind == "unknown_version":
                data, readable = job(input_uri=uris[0], version="99")
            elif kind == "missing_input":
                data, readable = job(input_uri=f"gs://{bucket}/chaos/missing-{i}.jpg")
            elif kind == "not_an_image":
                data, readable = job(input_uri=not_image)
            elif kind == "truncated_jpeg":
                data, readable = job(input_uri=truncated)
            elif kind == "huge_png":
                data, readable = job(input_uri=huge)
            elif kind == "inline_over_cap":
                data, readable = invalid(input_bytes=random.Random(i).randbytes(MAX_INLINE_BYTES + 1024))
            elif kind == "job_id_traversal":
                data, readable = invalid(input_uri=uris[0], job_id=f"../{job_id}")
            elif kind == "bucket_off_allowlist":
                data, readable = invalid(input_uri="gs://someone-elses-bucket/x.jpg")
            elif kind == "job_id_conflict":
                # A valid job under an id a finished job holds, on another input: it must not pass for it.
                other = next(uri for uri in [*uris, not_image] if uri != victim.input_uri)
                data, readable = invalid(
                    input_uri=other,
                    job_id=victim.job_id,
                    version=victim.model_version,
                    output_prefix=victim.output_prefix,
                )
            elif kind == "invalid_with_taken_id":
                data, readable = invalid(
                    input_uri=uris[0], job_id=victim.job_id, output_format="gif", output_prefix=victim.output_prefix
                )
            elif kind == "record_named_like_a_result":
                data, readable = invalid(
                    input_uri=uris[0], job_id=f"{victim.job_id}.embedding", output_prefix=victim.output_prefix
                )
            elif kind == "tiff_tile_bomb":
                data, readable = job(input_uri=tiff)
            elif kind == "webp_lossless_bomb":
                data, readable = job(input_uri=webp)
            elif kind == "progressive_scan_bomb":
                data, readable = job(input_uri=scans)
            elif kind == "param_out_of_range":
                data, readable = job(input_uri=uris[0], params={"scale": "1000"})
            elif kind == "param_not_a_number":
                data, readable = job(input_uri=uris[0], params={"scale": "abc"})
            elif kind == "param_for_triton":
                data, readable = job(input_uri=uris[0], params={"sequence_id": "7", "traceparent": FORGED_TRACEPARENT})
            elif kind == "version_flood":
                data, readable = job(input_uri=uris[0], version=str(100_000_000 + i))
            elif kind == "huge_error_text":
                data, readable = invalid(input_uri=uris[0], output_format="x" * (limit // 2))
            elif kind == "oversized_message":
                data, readable = json.dumps({"jobId": job_id, "model": MODEL, "pad": "x" * limit}).encode(), None
            elif kind == "params_flood":
                flood = {f"k{n}": "v" for n in range(limit // 16)}
                data, readable = ImageJob(job_id=job_id, model=MODEL, params=flood).SerializeToString(), None
            elif kind == "job_id_newline":
                data, readable = invalid(input_uri=uris[0], job_id=f"{job_id}\n")
            elif kind == "input_name_dotdot":
                data, readable = invalid(input_uri=f"gs://{bucket}/..")
            else:  # empty_message: Pub/Sub needs data or attributes, so it carries one attribute
                data, readable, attributes = b"", None, {"chaos": "empty"}
            made.append(BadMessage(kind, data, attributes, readable))
        return made

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
                alive.sample_rss()
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
        peak = max((w.sample_rss() for w in self.workers), default=0)
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


async def verify_duplicate_detection(stack: Stack) -> None:
    """The accounting's own check: an overwrite is seen as two generations, and create-only refuses a rewrite."""
    bucket = f"chaos-probe-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as session:
        url = f"{stack.gcs.url}/storage/v1/b?project=local-project"
        async with session.post(url, json={"name": bucket, "versioning": {"enabled": True}}) as response:
            response.raise_for_status()
    storage = Storage()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = stack.gcs.url
    try:
        await storage.start()
        ref = GcsRef(bucket, "probe/once.json")
        assert await storage.write_once(ref, b"{}", "application/json") is True
        assert await storage.write_once(ref, b"{}", "application/json") is False, "create-only write overwrote"
        twice = GcsRef(bucket, "probe/twice.json")
        await storage.upload(twice, b"1", "application/json")
        await storage.upload(twice, b"2", "application/json")
    finally:
        await storage.close()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
    async with aiohttp.ClientSession() as session:
        url = f"{stack.gcs.url}/storage/v1/b/{bucket}/o"
        async with session.get(url, params={"versions": "true"}) as response:
            items = (await response.json()).get("items", [])
    counts: dict[str, int] = {}
    for item in items:
        counts[item["name"]] = counts.get(item["name"], 0) + 1
    assert counts == {"probe/once.json": 1, "probe/twice.json": 2}, counts


@cache
def huge_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 30000x30000 1-bit PNG (about 100 KB, 900 megapixels): a decompression bomb."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_chunk = 1000
    chunks = [compressor.compress(row * rows_per_chunk) for _ in range(height // rows_per_chunk)]
    chunks.append(compressor.compress(row * (height % rows_per_chunk)))
    chunks.append(compressor.flush())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(chunks)) + chunk(b"IEND", b"")
