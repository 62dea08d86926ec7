"""What a job leaves behind: its result and its record in GCS, each written once, and its notice on the results topic.

Pub/Sub delivers at least once, so the same job may be finished twice: every
object is created only if absent, and carries the writing job's fingerprint in
its metadata, so a job that finds its name taken can tell itself (a
redelivery: nothing new to say) from another job under the same id (a
``job_id_conflict``, which never touches the first job's objects).

The pipeline decides when to write and what a failure to write means; this
module only writes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from worker import jobs
from worker.consumer import Delivery
from worker.errors import PermanentJobError, clip
from worker.jobs import GcsRef, Job, JobResult
from worker.models import Output
from worker.results import ResultsPublisher
from worker.storage import Storage, record_ref, result_ref

JOB_ID_CONFLICT = "job_id_conflict"


def same_job(found: Mapping[str, Any], fingerprint: str) -> bool:
    """Whether an object found under a job's name (its record, or its metadata) was written by this job.

    Objects written before fingerprints existed carry none and count as the job's own: the worker has
    written a fingerprint on every object since, so no one else can make one without.
    """
    return bool(found.get("fingerprint", fingerprint) == fingerprint)


def conflict(job_id: str) -> PermanentJobError:
    return PermanentJobError(
        JOB_ID_CONFLICT, f"job_id {job_id!r} names another job (model, input, output or params differ)"
    )


def new_record(
    job: Job | None, delivery: Delivery, version: str, status: int, timings_ms: Mapping[str, float]
) -> JobResult:
    """The ``JobResult`` of one delivery, as it stands now (the caller fills in its outcome)."""
    return JobResult(
        job_id=job.job_id if job else "",
        status=status,  # type: ignore[arg-type]
        model=job.model if job else "",
        model_version=version,
        timings_ms=timings_ms,
        finished_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        message_id=delivery.message_id,
        delivery_attempt=delivery.delivery_attempt or 0,
        latency_ms=round(max(0.0, time.time() - delivery.publish_time) * 1000, 3),
        traceparent=jobs.traceparent_of(delivery.attributes),
    )


def failure_record(
    delivery: Delivery,
    job: Job | None,
    error: PermanentJobError,
    *,
    message: jobs.ImageJob | None,
    version: str,
    timings_ms: Mapping[str, float],
    rules: jobs.JobRules,
) -> tuple[GcsRef, JobResult]:
    """The error record of a delivery that failed for good, and where it is written."""
    result = new_record(job, delivery, version, JobResult.FAILED, timings_ms)
    result.error_code = error.code
    result.error_message = error.message
    if job is None and message is not None:
        result.job_id = message.job_id if jobs.valid_job_id(message.job_id) else ""
        result.model = clip(message.model, 64)
    # A job's own failure is recorded under its name; a message that is no valid job, or that is
    # another job under a taken id, only under _invalid/, where it can shadow no one's record.
    if job is not None and error.code != JOB_ID_CONFLICT:
        result.fingerprint = jobs.fingerprint(job)
        return record_ref(job.output, job.job_id), result
    return jobs.invalid_record_ref(rules, delivery.message_id), result


class Recorder:
    """Writes results and records through the storage client, and publishes notices; owns neither client."""

    def __init__(self, storage: Storage, results: ResultsPublisher | None) -> None:
        self._storage = storage
        self._results = results

    async def finished_record(self, job: Job) -> dict[str, Any] | None:
        """The record an earlier delivery of this job's id left, if any."""
        return await self._storage.read_json(record_ref(job.output, job.job_id))

    async def write_result(self, job: Job, version: str, output: Output, result: JobResult) -> bool:
        """Write the result, notify, write the record; ``False`` if an earlier run had finished the job.

        Every object already there under this job's names is checked for this job's fingerprint: one
        written by another job under the same id makes this one a ``job_id_conflict``.
        """
        metadata = {"job_id": job.job_id, "model": job.model, "model_version": version}
        metadata["fingerprint"] = result.fingerprint
        start = time.perf_counter()
        ref = result_ref(job.output, job.job_id, output.extension)
        created = await self._storage.write_once(ref, output.data, output.content_type, metadata)
        # The record cannot time its own write: it carries the result's.
        result.timings_ms["write"] = round((time.perf_counter() - start) * 1000, 3)
        if not created and not same_job(await self._storage.read_metadata(ref) or {}, result.fingerprint):
            raise conflict(job.job_id)
        record = record_ref(job.output, job.job_id)
        existing = await self._storage.read_json(record)
        if existing is not None:
            if not same_job(existing, result.fingerprint):
                raise conflict(job.job_id)
            return False  # the same job, delivered again after it finished: nothing new to say
        await self._publish(result)
        if not await self._storage.write_once(record, jobs.result_json(result), "application/json", metadata):
            existing = await self._storage.read_json(record)
            if existing is None or not same_job(existing, result.fingerprint):
                raise conflict(job.job_id)  # another job took the name between our look and our write
        return True

    async def write_failure(self, ref: GcsRef, result: JobResult) -> None:
        """Notify (unless the failure is a conflict), then write the error record at ``ref`` if it is free."""
        if result.job_id and result.error_code != JOB_ID_CONFLICT:
            # A conflict's notice would reach whoever listens for the other job under this id.
            await self._publish(result)
        metadata = {"job_id": result.job_id, "error_code": result.error_code, "fingerprint": result.fingerprint}
        await self._storage.write_once(ref, jobs.result_json(result), "application/json", metadata)

    async def _publish(self, result: JobResult) -> None:
        # Before the record: a crash in between repeats the notice (at least once) rather than
        # losing it, since a redelivery that finds the record acks without publishing again.
        if self._results is not None:
            await self._results.publish(result)
