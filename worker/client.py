"""The producer's API: build an ``ImageJob``, upload a local image, publish, and await the ``JobResult``.

``tritonq publish`` is a thin face over this module; a web backend or a batch
job imports it directly::

    async with JobClient(Settings()) as client:
        job = await client.job_for_file(Path("cat.jpg"), model="enhance")
        await client.publish(job)
        result = await client.wait(job)

Publishing uses the Pub/Sub publisher's own batching (many ``publish`` calls
share requests); awaiting polls the result record with backoff. A job the
worker found invalid (or whose id another job holds) is recorded under
``_invalid/{message_id}``, not under its id: the client remembers the message
ids it published, and looks there too.
"""

from __future__ import annotations

import asyncio
import mimetypes
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from google.protobuf import json_format

from worker.config import Settings
from worker.jobs import INVALID_FOLDER, RESULTS_PREFIX, GcsRef, ImageJob, JobResult, join, parse_gs_uri
from worker.storage import Storage, record_ref

#: Backoff while awaiting a result record, in seconds: quick at first, then at most every second.
POLL_FIRST_S = 0.05
POLL_MAX_S = 1.0


def new_job_id() -> str:
    return uuid.uuid4().hex


def build_job(
    model: str,
    *,
    input_uri: str = "",
    input_bytes: bytes = b"",
    job_id: str = "",
    version: str = "",
    params: Mapping[str, str] | None = None,
    output_format: str = "",
    output_prefix: str = "",
    priority: str = "",
    timeout_s: float = 0.0,
    deadline: datetime | None = None,
) -> ImageJob:
    """An ``ImageJob`` with exactly one input."""
    if bool(input_uri) == bool(input_bytes):
        raise ValueError("give exactly one of input_uri and input_bytes")
    job = ImageJob(
        job_id=job_id or new_job_id(),
        model=model,
        model_version=version,
        output_prefix=output_prefix,
        output_format=output_format,
        params=dict(params or {}),
        priority=priority,
        timeout_s=timeout_s,
    )
    if deadline is not None:
        if deadline.tzinfo is None:
            raise ValueError("deadline needs a time zone, e.g. datetime.now(UTC) + timedelta(seconds=30)")
        job.deadline = deadline.isoformat()
    if input_uri:
        job.input_uri = input_uri
    else:
        job.input_bytes = input_bytes
    return job


def encode_job(job: ImageJob) -> bytes:
    """The message body: protobuf JSON, what the Pub/Sub schema's JSON encoding expects."""
    return json_format.MessageToJson(job, preserving_proto_field_name=False, indent=None).encode()


def _outermost(prefixes: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (bucket, prefix) pairs no other pair contains: a listing is recursive, so ``a/`` covers ``a/_invalid/``."""
    return {
        (bucket, prefix)
        for bucket, prefix in prefixes
        if not any(b == bucket and p != prefix and (not p or prefix.startswith(f"{p}/")) for b, p in prefixes)
    }


class JobClient:
    """Publishes jobs to the settings' topic and reads their records from GCS."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._storage = Storage()
        self._publisher: Any = None
        #: Message ids this client published, by job id: where the records of refused messages go.
        self._message_ids: dict[str, list[str]] = {}

    async def __aenter__(self) -> JobClient:
        from google.cloud import pubsub_v1

        await self._storage.start()
        self._publisher = pubsub_v1.PublisherClient()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._storage.close()
        if self._publisher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._publisher.stop)

    async def upload(self, path: Path, job_id: str) -> str:
        """Upload a local image to the input bucket; returns its ``gs://`` URI."""
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return await self.upload_bytes(
            await asyncio.to_thread(path.read_bytes), f"{job_id}{path.suffix.lower()}", content_type
        )

    async def upload_bytes(self, data: bytes, name: str, content_type: str = "image/jpeg") -> str:
        """Upload an encoded image as ``uploads/{name}`` in the input bucket; returns its URI."""
        ref = GcsRef(self.settings.input_bucket, join("uploads", name))
        await self._storage.upload(ref, data, content_type)
        return ref.uri

    async def job_for_file(self, path: Path, model: str, **options: Any) -> ImageJob:
        job_id = options.pop("job_id", "") or new_job_id()
        return build_job(model, input_uri=await self.upload(path, job_id), job_id=job_id, **options)

    async def publish(self, job: ImageJob, attributes: Mapping[str, str] | None = None) -> str:
        """Publish one job; returns the Pub/Sub message id.

        The job's priority is also set as the ``priority`` attribute: the worker orders the jobs it
        holds by it without decoding them.
        """
        extra = {"priority": job.priority.lower()} if job.priority else {}
        future = self._publisher.publish(self.settings.topic_path, encode_job(job), **extra, **dict(attributes or {}))
        message_id: str = await asyncio.wrap_future(future)
        self._message_ids.setdefault(job.job_id, []).append(message_id)
        return message_id

    async def publish_raw(self, data: bytes, attributes: Mapping[str, str] | None = None) -> str:
        """Publish arbitrary bytes (tests of bad input)."""
        future = self._publisher.publish(self.settings.topic_path, data, **dict(attributes or {}))
        message_id: str = await asyncio.wrap_future(future)
        return message_id

    def output_of(self, job: ImageJob) -> GcsRef:
        if job.output_prefix:
            return parse_gs_uri(job.output_prefix)
        return GcsRef(self.settings.output_bucket, RESULTS_PREFIX)

    def records_of(self, job: ImageJob) -> list[GcsRef]:
        """Where the job's record may be: beside its result, or under ``_invalid/`` for each message published."""
        invalid = GcsRef(self.settings.output_bucket, join(RESULTS_PREFIX, INVALID_FOLDER))
        refs = [record_ref(self.output_of(job), job.job_id)] if job.job_id else []
        return refs + [
            GcsRef(invalid.bucket, join(invalid.name, f"{m}.json")) for m in self._message_ids.get(job.job_id, [])
        ]

    async def result(self, job: ImageJob) -> JobResult | None:
        """The job's record if it has been written."""
        for ref in self.records_of(job):
            found = await self._read_record(ref)
            if found is not None:
                return found
        return None

    async def _read_record(self, ref: GcsRef) -> JobResult | None:
        document = await self._storage.read_json(ref)
        if document is None:
            return None
        return json_format.ParseDict(document, JobResult(), ignore_unknown_fields=True)

    async def wait(self, job: ImageJob, timeout_s: float = 300.0) -> JobResult:
        """Poll for the job's record with backoff; ``TimeoutError`` if it does not come."""
        delay = POLL_FIRST_S
        async with asyncio.timeout(timeout_s):
            while True:
                found = await self.result(job)
                if found is not None:
                    return found
                await asyncio.sleep(delay)
                delay = min(POLL_MAX_S, delay * 1.5)

    async def wait_many(
        self, jobs: Sequence[ImageJob], timeout_s: float = 600.0, on_result: Callable[[JobResult], None] | None = None
    ) -> list[JobResult]:
        """Await many jobs at once: one listing per poll finds the new records, instead of a read per job."""
        places = [self.records_of(job) for job in jobs]
        pending = {ref: index for index, refs in enumerate(places) for ref in refs}
        results: list[JobResult | None] = [None] * len(jobs)
        delay = POLL_FIRST_S
        async with asyncio.timeout(timeout_s):
            while pending:
                listed: set[GcsRef] = set()
                for bucket, prefix in _outermost({(ref.bucket, ref.name.rpartition("/")[0]) for ref in pending}):
                    names = await self._storage.list_names(bucket, f"{prefix}/" if prefix else "")
                    listed |= {GcsRef(bucket, name) for name in names}
                for ref in [ref for ref in pending if ref in listed]:
                    if ref not in pending:
                        continue  # the job was found at another of its places this round
                    result = await self._read_record(ref)
                    if result is None:  # listed but not yet readable: look again next round
                        continue
                    index = pending[ref]
                    for place in places[index]:
                        pending.pop(place, None)
                    results[index] = result
                    if on_result is not None:
                        on_result(result)
                if pending:
                    await asyncio.sleep(delay)
                    delay = min(POLL_MAX_S, delay * 1.5)
        return [r for r in results if r is not None]

    async def read(self, uri: str) -> bytes:
        """Read a result object (at most 1 GiB)."""
        return await self._storage.read_input(parse_gs_uri(uri), 1 << 30)
