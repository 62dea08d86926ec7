"""The flow of one job, top to bottom: each stage a named method, and the one place a message's fate is decided.

``Pipeline.handle`` takes one Pub/Sub delivery through its stages:

    parse -> route -> (already done?) -> fetch -> preprocess -> infer -> postprocess -> write -> ack

and decides the message's fate:

- success: the result and its record are durable in GCS, then the message is acked;
- the same job again (same id, same ``jobs.fingerprint``): acked as a duplicate; another job under
  the same id: ``job_id_conflict``, recorded under ``_invalid/`` without touching the first one's objects;
- ``PermanentJobError`` (bad input): an error record is written where the result
  would be, then the message is acked; it is never retried;
- ``TransientError``: the failing step was already retried with backoff; the
  message is nacked and Pub/Sub redelivers it;
- cancellation (shutdown past its grace period): nack, then re-raise;
- anything else is a bug: logged with its traceback, counted, nacked.

``run_workers`` runs ``max_in_flight`` copies of the loop that takes deliveries
off the consumer's queue, so the number of jobs in progress is one number. The
bounds inside a job (pixels held, requests admitted to Triton) are
``worker.scheduling``'s; what a job writes is ``worker.records``'.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import structlog

from worker import images, jobs, routing, telemetry
from worker.catalog import Catalog
from worker.config import Settings
from worker.consumer import MAX_LEASE_DURATION_S, Delivery
from worker.errors import RETRY_BASE_S, PermanentJobError, TransientError, clip, retrying
from worker.images import MAX_DECODE_S, DecodeLimits, ImageInfo
from worker.jobs import GcsRef, Job, JobResult
from worker.models import SHAPE_BUCKETS_PX, ModelSpec, Output, Prepared
from worker.records import Recorder, conflict, failure_record, new_record, same_job
from worker.results import ResultsPublisher
from worker.scheduling import TRITON_QUEUE_BATCHES, Admission, PixelBudget, run_workers
from worker.storage import Storage, result_ref
from worker.triton import INFER_TIMEOUT_S, TritonStream
from worker.wire import InferResult

log = structlog.get_logger(__name__)
T = TypeVar("T")

SUCCEEDED = "succeeded"
FAILED_PERMANENT = "failed_permanent"
NACKED = "nacked"
DUPLICATE = "duplicate"
#: Seconds before the lease's end at which an unfinished job is nacked.
LEASE_MARGIN_S = 10.0
#: Pixels: an image this small is decoded and encoded on the event loop; a thread hand-off costs more than its work.
INLINE_MAX_PIXELS = 256 * 256
#: Bytes: an image of more encoded bytes goes to the threads whatever its pixels (many scans cost CPU too).
INLINE_MAX_BYTES = 64 * 1024
#: ``job_succeeded`` lines a second: success must not flood the logs; every failure is logged.
LOG_SUCCESS_PER_S = 1.0
#: ``params.preprocess = "server"`` sends a job to this variant of its model (``enhance`` -> ``enhance_bytes``).
SERVER_SIDE_SUFFIX = "_bytes"


def deadline_exceeded() -> PermanentJobError:
    """A new error each time: one instance raised again would carry every earlier traceback, and their arrays."""
    return PermanentJobError("deadline_exceeded", "the job's deadline passed before it was computed")


@dataclass(frozen=True)
class Target:
    """Where a job runs: the model it named, the model variant and version that serve it, and its spec."""

    job_model: str
    model: str
    version: str
    spec: ModelSpec


class Pipeline:
    """Processes deliveries; owns nothing it did not create (clients are handed in)."""

    def __init__(
        self,
        settings: Settings,
        stream: TritonStream,
        catalog: Catalog,
        storage: Storage,
        executor: ThreadPoolExecutor,
        *,
        results: ResultsPublisher | None = None,
        pixels: PixelBudget | None = None,
        shape_buckets_px: tuple[int, ...] = SHAPE_BUCKETS_PX,
        inline_max_pixels: int = INLINE_MAX_PIXELS,
        inline_max_bytes: int = INLINE_MAX_BYTES,
        retry_base_s: float = RETRY_BASE_S,
    ) -> None:
        self._settings = settings
        self._stream = stream
        self._catalog = catalog
        self._records = Recorder(storage, results)
        self._executor = executor
        self._routes = routing.parse_routes(settings.routes)
        self._limits = DecodeLimits(settings.max_input_bytes, settings.max_input_pixels, max_seconds=MAX_DECODE_S)
        self._buckets, self._retry_base_s = shape_buckets_px, retry_base_s
        self._inline_max_pixels, self._inline_max_bytes = inline_max_pixels, inline_max_bytes
        self._storage = storage
        self._max_message_bytes = jobs.max_message_bytes(settings.max_inline_bytes)
        self._rules = jobs.JobRules(
            input_buckets=settings.input_buckets,
            output_buckets=settings.output_buckets,
            default_output=GcsRef(settings.output_bucket, jobs.RESULTS_PREFIX),
            max_inline_bytes=settings.max_inline_bytes,
        )
        # Jobs in progress by id, with their fingerprints: a second delivery of the same job waits for the first.
        self._active: dict[str, tuple[str, asyncio.Future[str]]] = {}
        self._success_log = telemetry.RateLimiter(per_s=LOG_SUCCESS_PER_S)
        self._admissions: dict[str, Admission] = {}
        self._pixels = pixels or PixelBudget(settings.max_pixels_in_flight)
        self.in_flight = 0

    # -- the concurrency around one job ------------------------------------------------------

    async def run_workers(self, queue: asyncio.Queue[Delivery], count: int) -> None:
        """Run ``count`` workers taking deliveries off ``queue`` and handling them, until cancelled."""
        await run_workers(queue, self.handle, count)

    # -- one job: its fate ---------------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> str:
        """Process one delivery and ack or nack it; returns the outcome."""
        self.in_flight += 1
        telemetry.IN_FLIGHT.inc()
        try:
            trace = telemetry.trace_fields(jobs.traceparent_of(delivery.attributes), self._settings.project)
            ids = {"message_id": delivery.message_id, "delivery_attempt": delivery.delivery_attempt}
            with structlog.contextvars.bound_contextvars(**ids, **trace):
                return await self._decide(delivery, telemetry.StageTimer())
        finally:
            self.in_flight -= 1
            telemetry.IN_FLIGHT.dec()

    async def _decide(self, delivery: Delivery, timer: telemetry.StageTimer) -> str:
        """Run the job and turn how it ended into an ack or a nack: the one place that decides."""
        message: jobs.ImageJob | None = None
        job: Job | None = None
        try:
            message = jobs.decode_message(delivery.data, delivery.attributes, self._max_message_bytes)
            job = jobs.validate(message, self._rules, delivery.publish_time)
            timer.model = self._catalog.label(job.model)
            structlog.contextvars.bind_contextvars(job_id=job.job_id, model=job.model)
            # The client stops extending the lease after max_lease_duration: nack before then, so
            # the message is redelivered once, on purpose, rather than twice behind our back.
            held_s = time.monotonic() - delivery.received_at
            async with asyncio.timeout(MAX_LEASE_DURATION_S - LEASE_MARGIN_S - held_s):
                return await self._once(job, delivery, timer)
        except TimeoutError:
            return self._nack(delivery, job, "lease_expiring", "the job outlived its lease")
        except TransientError as error:
            if job is None or not job.expired(time.time()):
                return self._nack(delivery, job, "transient", str(error))
            # Retrying cannot help a job whose deadline passed while it failed.
            return await self._fail_permanently(
                delivery, job, deadline_exceeded(), message=message, version="", timer=timer
            )
        except PermanentJobError as error:
            version = ""
            if job is not None:
                version = routing.choose_version(job.model, job.requested_version, job.job_id, self._routes)
            return await self._fail_permanently(delivery, job, error, message=message, version=version, timer=timer)
        except asyncio.CancelledError:
            self._nack(delivery, job, "cancelled", "worker stopping")
            raise
        except Exception as error:
            log.exception("job_crashed", error=clip(str(error)))
            return self._nack(delivery, job, "bug", repr(error))

    async def _once(self, job: Job, delivery: Delivery, timer: telemetry.StageTimer) -> str:
        """Run the job unless the same job is already running here; then share its outcome."""
        fingerprint = jobs.fingerprint(job)
        active = self._active.get(job.job_id)
        if active is not None:
            running_fingerprint, running = active
            if running_fingerprint != fingerprint:
                raise conflict(job.job_id)
            outcome = await asyncio.shield(running)
            if outcome in (SUCCEEDED, FAILED_PERMANENT, DUPLICATE):
                delivery.ack()
                return DUPLICATE
            return self._nack(delivery, job, "duplicate_in_flight", "the same job failed in flight")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._active[job.job_id] = (fingerprint, future)
        outcome = NACKED
        try:
            outcome = await self._run(job, fingerprint, delivery, timer)
            return outcome
        finally:
            self._active.pop(job.job_id, None)
            future.set_result(outcome)

    # -- one job: its stages, in order ---------------------------------------------------------

    async def _run(self, job: Job, fingerprint: str, delivery: Delivery, timer: telemetry.StageTimer) -> str:
        target = await self._route(job)
        if job.expired(time.time()):
            raise deadline_exceeded()
        if await self._already_done(job, fingerprint, delivery, target):
            delivery.ack()
            return DUPLICATE
        data = await timer.stage("fetch", self._retry(partial(self._fetch, job), "fetch", target))
        info = images.inspect(data, self._limits)
        held = self._pixels_held(target.spec, info, job)
        await self._pixels.acquire(held)
        try:
            prepared = await timer.stage("preprocess", self._preprocess(target.spec, job, data, info))
            del data
            infer = partial(self._infer, target, job, prepared, jobs.traceparent_of(delivery.attributes))
            inferred = await timer.stage("infer", self._retry(infer, "infer", target))
            try:
                output = await timer.stage("postprocess", self._postprocess(target.spec, job, prepared, inferred))
            finally:
                # The output may be a view of a shared-memory region: hand it back only once encoded.
                inferred.release()
        finally:
            self._pixels.release(held)
        served = inferred.model_version
        result = new_record(job, delivery, served, JobResult.SUCCEEDED, timer.timings_ms)
        result.fingerprint = fingerprint
        result.output_uri = result_ref(job.output, job.job_id, output.extension).uri
        result.output_shape.extend(output.shape)
        # The write precedes the ack and must survive cancellation, or a durable result could go unrecorded.
        write = partial(self._records.write_result, job, served, output, result)
        fresh = await timer.stage("write", asyncio.shield(self._retry(write, "write", target)))
        delivery.ack()
        return self._succeeded(delivery, target, result, fresh=fresh, timer=timer)

    async def _route(self, job: Job) -> Target:
        """The model variant and version that serve this job; an unknown one or a bad param fails it here."""
        model = job.model
        if job.params.get("preprocess") == "server":
            # The model's ensemble decodes and encodes inside Triton: the worker only moves bytes.
            model = f"{job.model}{SERVER_SIDE_SUFFIX}"
        spec = await self._catalog.spec(model)
        spec.request_parameters(job.params)  # an undeclared or out-of-range param fails before any work
        version = routing.choose_version(model, job.requested_version, job.job_id, self._routes)
        await self._catalog.check_version(model, version)
        structlog.contextvars.bind_contextvars(version=version or "default")
        return Target(job.model, model, version, spec)

    async def _already_done(self, job: Job, fingerprint: str, delivery: Delivery, target: Target) -> bool:
        """Whether a redelivery (or a dead letter's earlier attempt) finds its job finished already."""
        if delivery.delivery_attempt is not None and delivery.delivery_attempt <= 1:
            return False
        existing = await self._retry(partial(self._records.finished_record, job), "check", target)
        if existing is None:
            return False
        if not same_job(existing, fingerprint):
            raise conflict(job.job_id)
        log.info("job_already_done", status=existing.get("status"))
        served_label = self._catalog.version_label(target.model, existing.get("model_version") or target.version)
        telemetry.JOBS.labels(job.model, served_label, DUPLICATE).inc()
        return True

    async def _fetch(self, job: Job) -> bytes:
        if job.input_bytes is not None:
            telemetry.BYTES_READ.inc(len(job.input_bytes))
            return job.input_bytes
        assert job.input_ref is not None
        return await self._storage.read_input(job.input_ref, self._settings.max_input_bytes)

    @staticmethod
    def _pixels_held(spec: ModelSpec, info: ImageInfo, job: Job) -> int:
        """From decode to encode a job holds its pixels; a format that takes more bytes per pixel than
        a plain JPEG while it decodes weighs more."""
        held = spec.pixels_held(info.width, info.height, job.params)
        return held + round(info.pixels * (images.decode_weight(info) - 1))

    async def _preprocess(self, spec: ModelSpec, job: Job, data: bytes, info: ImageInfo) -> Prepared:
        args = (data, self._limits, job.params, self._buckets)
        return await self._image_work(info.pixels, len(data), spec.preprocess, *args)

    async def _infer(self, target: Target, job: Job, prepared: Prepared, traceparent: str) -> InferResult:
        spec = target.spec
        timeout_s = INFER_TIMEOUT_S
        remaining = job.remaining_s(time.time())
        if remaining is not None:
            if remaining <= 0:
                raise deadline_exceeded()
            # Triton drops the request from its queue once the job is worthless.
            timeout_s = min(timeout_s, remaining)
        parameters = dict(prepared.parameters)
        if traceparent:
            parameters["traceparent"] = traceparent
        batch = prepared.array[np.newaxis] if spec.batched else prepared.array
        output_bytes = spec.output_nbytes(prepared)
        admission = self._admission(spec)
        await admission.acquire(batch.shape, job.priority)
        try:
            return await self._stream.infer(
                spec.name,
                target.version,
                [(spec.input.name, spec.input.wire_dtype, batch)],
                parameters=parameters,
                timeout_s=timeout_s,
                priority=job.priority,
                shm_output=(spec.output.name, output_bytes) if output_bytes else None,
            )
        finally:
            admission.release()

    async def _postprocess(self, spec: ModelSpec, job: Job, prepared: Prepared, inferred: InferResult) -> Output:
        array = inferred.outputs[spec.output.name]
        array = array[0] if spec.batched else array
        # Elements over three: the pixels of an image output, and "few" for any other tensor.
        return await self._image_work(array.size // 3, 0, spec.postprocess, array, prepared, job.output_format)

    def _succeeded(
        self, delivery: Delivery, target: Target, result: JobResult, *, fresh: bool, timer: telemetry.StageTimer
    ) -> str:
        served = result.model_version
        served_label = self._catalog.version_label(target.model, served)
        if not fresh:
            log.info("job_already_done", version=served)
            telemetry.JOBS.labels(result.model, served_label, DUPLICATE).inc()
            return DUPLICATE
        telemetry.JOBS.labels(result.model, served_label, SUCCEEDED).inc()
        telemetry.JOB_LATENCY_SECONDS.labels(result.model).observe(max(0.0, time.time() - delivery.publish_time))
        if self._success_log.allow():
            log.info("job_succeeded", version=served, output_uri=result.output_uri, timings_ms=timer.timings_ms)
        return SUCCEEDED

    # -- what the stages share -------------------------------------------------------------------

    def _admission(self, spec: ModelSpec) -> Admission:
        admission = self._admissions.get(spec.name)
        if admission is None:
            batch = max(1, spec.max_batch_size)
            limit = max(1, TRITON_QUEUE_BATCHES * batch)
            admission = self._admissions[spec.name] = Admission(batch, limit)
        return admission

    async def _retry(self, step: Callable[[], Awaitable[T]], what: str, target: Target | None = None) -> T:
        """``retrying`` with its attempts and this pipeline's backoff; each retry of a routed job is counted."""
        return await retrying(step, base_s=self._retry_base_s, what=what, on_retry=partial(self._count_retry, target))

    def _count_retry(self, target: Target | None) -> None:
        if target is not None:
            version = self._catalog.version_label(target.model, target.version)
            telemetry.JOBS.labels(target.job_model, version, "retried").inc()

    async def _image_work(self, pixels: int, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-bound image work: small images on the event loop, large ones in the thread pool.

        Small means few pixels and few encoded bytes: a decode costs CPU in proportion to both, and a
        hand-off to a thread and back (a futex wake, an eventfd write, the GIL changing hands twice)
        costs about as much as a small image's work. In the pool a JPEG codec runs without the GIL.
        """
        if pixels <= self._inline_max_pixels and nbytes <= self._inline_max_bytes:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- the other outcomes ------------------------------------------------------------------------

    async def _fail_permanently(
        self,
        delivery: Delivery,
        job: Job | None,
        error: PermanentJobError,
        *,
        message: jobs.ImageJob | None,
        version: str,
        timer: telemetry.StageTimer,
    ) -> str:
        ref, result = failure_record(
            delivery, job, error, message=message, version=version, timings_ms=timer.timings_ms, rules=self._rules
        )
        try:
            await asyncio.shield(self._retry(partial(self._records.write_failure, ref, result), "write_error_record"))
        except TransientError as exc:
            return self._nack(delivery, job, "transient", f"error record not written: {exc}")
        delivery.ack()
        model_label = self._catalog.label(result.model)
        telemetry.JOBS.labels(model_label, self._catalog.version_label(result.model, version), FAILED_PERMANENT).inc()
        telemetry.FAILURES.labels(error.code).inc()
        log.warning("job_failed", reason=error.code, error=error.message, record=ref.uri)
        return FAILED_PERMANENT

    def _nack(self, delivery: Delivery, job: Job | None, reason: str, error: str) -> str:
        delivery.nack()
        telemetry.JOBS.labels(self._catalog.label(job.model) if job else "unknown", "default", NACKED).inc()
        telemetry.FAILURES.labels(reason).inc()
        log.warning("job_nacked", reason=reason, error=clip(error))
        return NACKED
