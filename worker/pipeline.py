"""The flow of one job, top to bottom, and the bounded concurrency around it.

``Pipeline.handle`` takes one Pub/Sub delivery through every stage:

    decode + validate -> route -> (already done?) -> fetch -> preprocess -> infer -> postprocess -> write -> ack

and is the only place that decides a message's fate:

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
off the consumer's queue, so the number of jobs in progress is one number.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import heapq
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
import structlog

from worker import images, jobs, routing, telemetry
from worker.config import Settings
from worker.consumer import Delivery
from worker.errors import PermanentJobError, TransientError, clip
from worker.images import DecodeLimits
from worker.jobs import GcsRef, Job, JobResult
from worker.models import ModelSpec, Output, Prepared
from worker.results import ResultsPublisher
from worker.storage import Storage, record_ref, result_ref
from worker.triton import Catalog, InferResult, TritonStream

log = structlog.get_logger(__name__)
T = TypeVar("T")

SUCCEEDED = "succeeded"
FAILED_PERMANENT = "failed_permanent"
NACKED = "nacked"
DUPLICATE = "duplicate"
#: Seconds before the lease's end at which an unfinished job is nacked.
LEASE_MARGIN_S = 10.0
#: ``params.preprocess = "server"`` sends a job to this variant of its model (``enhance`` -> ``enhance_bytes``).
SERVER_SIDE_SUFFIX = "_bytes"
DEADLINE_EXCEEDED = PermanentJobError("deadline_exceeded", "the job's deadline passed before it was computed")
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


@dataclass
class Timer:
    """Milliseconds per stage of one job, observed into the stage histogram as they end."""

    model: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)

    async def stage(self, name: str, work: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            return await work
        finally:
            elapsed = time.perf_counter() - start
            self.timings_ms[name] = round(elapsed * 1000, 3)
            telemetry.STAGE_SECONDS.labels(name, self.model or "unknown").observe(elapsed)


async def retrying(
    step: Callable[[], Awaitable[T]], *, attempts: int, base_s: float, what: str, on_retry: Callable[[], None]
) -> T:
    """Run ``step``; on ``TransientError`` retry with exponential backoff and full jitter, then give up."""
    for attempt in range(1, attempts + 1):
        try:
            return await step()
        except TransientError as exc:
            if attempt == attempts:
                raise
            on_retry()
            delay = random.uniform(0, base_s * 2 ** (attempt - 1))
            log.info("retrying", step=what, attempt=attempt, delay_s=round(delay, 3), error=clip(str(exc)))
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class DeliveryQueue(asyncio.Queue[Delivery]):
    """The hand-off from the consumer to the pipeline: by the job's priority, then by arrival.

    The priority comes from the message's ``priority`` attribute (``tritonq publish`` and
    ``JobClient`` set it from the job), so ordering needs no decoding on the consumer's thread.
    Triton's own priority orders what is already in its queue; this orders what the worker
    holds but has not started, so a high-priority job overtakes a held backlog too.
    """

    # The same hooks asyncio.PriorityQueue overrides; ``_queue`` is the name the base class reads.
    def _init(self, maxsize: int) -> None:
        self._queue: list[tuple[int, int, Delivery]] = []
        self._arrivals = itertools.count()

    def _put(self, item: Delivery) -> None:
        rank = jobs.PRIORITIES.get(item.attributes.get("priority", "").lower(), jobs.PRIORITIES["normal"])
        heapq.heappush(self._queue, (rank, next(self._arrivals), item))

    def _get(self) -> Delivery:
        return heapq.heappop(self._queue)[2]


Shape = tuple[int, ...]


class PixelBudget:
    """Pixels the jobs in flight may hold at once: memory stays bounded whatever the images' sizes.

    ``max_in_flight`` bounds jobs, not bytes: 64 jobs of 1024 px images peaked
    at 700 MB of worker RSS in the benchmark, and the input limit (40 MP) would
    let 64 jobs need tens of GB. A job takes its weight (``ModelSpec.pixels_held``)
    after reading its input's header and before decoding it, and gives it back
    once its output is encoded. Jobs wait in arrival order; one job always runs,
    however large, so none waits forever.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def used(self) -> int:
        return self._used

    async def acquire(self, weight: int) -> None:
        if not self._waiting and self._fits(weight):
            self._used += weight
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (weight, future)
        self._waiting.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(weight)  # granted as we were cancelled: hand it on
            else:
                if entry in self._waiting:  # a grant may have passed over it already
                    self._waiting.remove(entry)
                self._grant()  # a large job leaving the head may let the next ones in
            raise

    def release(self, weight: int) -> None:
        self._used -= weight
        self._grant()

    def _fits(self, weight: int) -> bool:
        return self._used == 0 or self._used + weight <= self._limit

    def _grant(self) -> None:
        while self._waiting:
            weight, future = self._waiting[0]
            if future.done():
                # Cancelled while waiting (a shutdown cancels many at once): its task has not run
                # its handler yet, and leaves without pixels.
                self._waiting.popleft()
                continue
            if not self._fits(weight):
                return
            self._waiting.popleft()
            self._used += weight
            future.set_result(None)


class Admission:
    """Requests one model may have in Triton at once, admitted in runs of one shape.

    Triton's dynamic batcher batches only requests of one shape, and it takes its
    queue in order: a request of another shape closes the batch. Measured on
    ``style_comic``: 32 requests of two shapes sent alternately ran as 31
    executions, sent grouped as 3. So the worker mostly sends one shape at a
    time per model: a request is admitted at once when the model has few in
    flight (under a quarter of ``batch``, the model's ``max_batch_size``: a
    quiet system waits for nothing), or when it has the shape admitted last and
    fewer than ``limit`` are in flight (a small multiple of ``batch``: the next
    batch is queued while one runs). After ``batch`` of one shape in a row
    while other shapes wait, the oldest waiting shape goes next. Waiting
    requests are admitted higher priorities first, then same shape, else oldest.
    """

    def __init__(self, batch: int, limit: int) -> None:
        self._batch = batch
        self._limit = max(limit, batch)
        # Any shape may start while fewer than a quarter batch are in flight. Measured with two
        # shapes over five models: 0 (one shape at a time) left Triton idle between runs, a whole
        # batch let interleaved shapes through; a quarter gave the largest batches and the shortest run.
        self._first = max(1, batch // 4)
        self._in_flight = 0
        self._waiting: list[tuple[int, int, Shape, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self._last: Shape | None = None
        self._streak = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, shape: Shape, priority: int) -> None:
        if not self._waiting and self._allowed(shape):
            self._admit(shape)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (priority or jobs.PRIORITIES["normal"], next(self._arrivals), shape, future)
        self._waiting.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # admitted as we were cancelled: hand the slot on
            elif entry in self._waiting:  # a release may have passed over it already
                self._waiting.remove(entry)
            raise

    def release(self) -> None:
        self._in_flight -= 1
        # Waiters cancelled but not yet resumed (a shutdown cancels many at once) take no slot.
        self._waiting = [entry for entry in self._waiting if not entry[3].done()]
        while (entry := self._pick()) is not None:
            self._waiting.remove(entry)
            self._admit(entry[2])
            entry[3].set_result(None)

    def _allowed(self, shape: Shape) -> bool:
        if self._in_flight < self._first:
            return True
        if self._in_flight >= self._limit or shape != self._last:
            return False
        return self._streak < self._batch or all(entry[2] == shape for entry in self._waiting)

    def _pick(self) -> tuple[int, int, Shape, asyncio.Future[None]] | None:
        if not self._waiting:
            return None
        best = min(entry[0] for entry in self._waiting)
        candidates = [entry for entry in self._waiting if entry[0] == best]
        same = next((entry for entry in candidates if entry[2] == self._last), None)
        if same is not None and self._allowed(same[2]):
            return same
        oldest = min(candidates, key=lambda entry: entry[1])
        return oldest if self._allowed(oldest[2]) else None

    def _admit(self, shape: Shape) -> None:
        self._in_flight += 1
        self._streak = self._streak + 1 if shape == self._last else 1
        self._last = shape


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
    ) -> None:
        self._settings = settings
        self._results = results
        self._stream = stream
        self._catalog = catalog
        self._storage = storage
        self._executor = executor
        self._routes = routing.parse_routes(settings.routes)
        self._limits = DecodeLimits(
            max_bytes=settings.max_input_bytes, max_pixels=settings.max_input_pixels, max_seconds=settings.max_decode_s
        )
        self._max_message_bytes = jobs.max_message_bytes(settings.max_inline_bytes)
        self._rules = jobs.JobRules(
            input_buckets=settings.input_buckets,
            output_buckets=settings.output_buckets,
            default_output=GcsRef(settings.output_bucket, settings.output_prefix.strip("/")),
            max_inline_bytes=settings.max_inline_bytes,
        )
        # Jobs in progress by id, with their fingerprints: a second delivery of the same job waits for the first.
        self._active: dict[str, tuple[str, asyncio.Future[str]]] = {}
        self._success_log = telemetry.RateLimiter(per_s=settings.log_success_per_s)
        self._admissions: dict[str, Admission] = {}
        self._pixels = PixelBudget(settings.max_pixels_in_flight)
        self.in_flight = 0

    # -- the concurrency around one job ------------------------------------------------------

    async def run_workers(self, queue: asyncio.Queue[Delivery], count: int) -> None:
        """Run ``count`` workers taking deliveries off ``queue`` until cancelled."""
        async with asyncio.TaskGroup() as group:
            for index in range(count):
                group.create_task(self._work(queue), name=f"pipeline-worker-{index}")

    async def _work(self, queue: asyncio.Queue[Delivery]) -> None:
        while True:
            delivery = await queue.get()
            try:
                await self.handle(delivery)
            finally:
                queue.task_done()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A job that swallowed its cancellation (a bug turned it into another error) must not
                # keep this worker taking deliveries: the shutdown waits for it.
                raise asyncio.CancelledError

    # -- one job, top to bottom --------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> str:
        """Process one delivery and ack or nack it; returns the outcome."""
        self.in_flight += 1
        telemetry.IN_FLIGHT.inc()
        timer = Timer()
        context: dict[str, Any] = {
            "message_id": delivery.message_id,
            "delivery_attempt": delivery.delivery_attempt,
        }
        traceparent = jobs.traceparent_of(delivery.attributes)
        if traceparent:
            # Cloud Logging links log lines to the trace through these two fields.
            _, trace_id, span_id, _ = traceparent.split("-")
            context["logging.googleapis.com/trace"] = f"projects/{self._settings.project}/traces/{trace_id}"
            context["logging.googleapis.com/spanId"] = span_id
        job: Job | None = None
        version = ""
        message: jobs.ImageJob | None = None
        try:
            with structlog.contextvars.bound_contextvars(**context):
                try:
                    message = jobs.decode_message(delivery.data, delivery.attributes, self._max_message_bytes)
                    job = jobs.validate(message, self._rules, delivery.publish_time)
                    timer.model = self._catalog.label(job.model)
                    structlog.contextvars.bind_contextvars(job_id=job.job_id, model=job.model)
                    # The client stops extending the lease after max_lease_duration: nack before then, so
                    # the message is redelivered once, on purpose, rather than twice behind our back.
                    held_s = time.monotonic() - delivery.received_at
                    async with asyncio.timeout(self._settings.max_lease_duration_s - LEASE_MARGIN_S - held_s):
                        fingerprint = jobs.fingerprint(job)
                        run = functools.partial(self._run, job, fingerprint, delivery, timer)
                        return await self._once(job, fingerprint, delivery, run)
                except TimeoutError:
                    return self._nack(delivery, job, "lease_expiring", "the job outlived its lease")
                except TransientError as error:
                    if job is None or not job.expired(time.time()):
                        return self._nack(delivery, job, "transient", str(error))
                    # Retrying cannot help a job whose deadline passed while it failed.
                    return await self._fail_permanently(
                        delivery, message=message, job=job, version=version, error=DEADLINE_EXCEEDED, timer=timer
                    )
                except PermanentJobError as error:
                    if job is not None:
                        version = routing.choose_version(job.model, job.requested_version, job.job_id, self._routes)
                    return await self._fail_permanently(
                        delivery, message=message, job=job, version=version, error=error, timer=timer
                    )
                except asyncio.CancelledError:
                    self._nack(delivery, job, "cancelled", "worker stopping")
                    raise
                except Exception as error:
                    log.exception("job_crashed", error=clip(str(error)))
                    return self._nack(delivery, job, "bug", repr(error))
        finally:
            self.in_flight -= 1
            telemetry.IN_FLIGHT.dec()

    async def _once(self, job: Job, fingerprint: str, delivery: Delivery, run: Callable[[], Awaitable[str]]) -> str:
        """Run the job unless the same job is already running here; then share its outcome."""
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
            outcome = await run()
            return outcome
        finally:
            self._active.pop(job.job_id, None)
            future.set_result(outcome)

    async def _run(self, job: Job, fingerprint: str, delivery: Delivery, timer: Timer) -> str:
        model = job.model
        if job.params.get("preprocess") == "server":
            # The model's ensemble decodes and encodes inside Triton: the worker only moves bytes.
            model = f"{job.model}{SERVER_SIDE_SUFFIX}"
        spec = await self._catalog.spec(model)
        spec.request_parameters(job.params)  # an undeclared or out-of-range param fails before any work
        version = routing.choose_version(model, job.requested_version, job.job_id, self._routes)
        await self._catalog.check_version(model, version)
        structlog.contextvars.bind_contextvars(version=version or "default")

        def retried() -> None:
            telemetry.JOBS.labels(job.model, self._catalog.version_label(model, version), "retried").inc()

        async def retry(step: Callable[[], Awaitable[T]], what: str) -> T:
            return await self._retry(step, what, on_retry=retried)

        if job.expired(time.time()):
            raise DEADLINE_EXCEEDED
        # A redelivery (or a dead letter's earlier attempt) may have finished already.
        if delivery.delivery_attempt is None or delivery.delivery_attempt > 1:
            existing = await retry(lambda: self._storage.read_json(record_ref(job.output, job.job_id)), "check")
            if existing is not None:
                if not same_job(existing, fingerprint):
                    raise conflict(job.job_id)
                log.info("job_already_done", status=existing.get("status"))
                delivery.ack()
                served_label = self._catalog.version_label(model, existing.get("model_version") or version)
                telemetry.JOBS.labels(job.model, served_label, DUPLICATE).inc()
                return DUPLICATE

        data = await timer.stage("fetch", retry(lambda: self._fetch(job), "fetch"))
        info = images.inspect(data, self._limits)
        # From decode to encode a job holds its pixels, and the budget bounds their sum; a format that
        # takes more bytes per pixel than a plain JPEG while it decodes weighs more.
        held = spec.pixels_held(info.width, info.height, job.params)
        held += round(info.pixels * (images.decode_weight(info) - 1))
        await self._pixels.acquire(held)
        try:
            prepared = await timer.stage(
                "preprocess",
                self._image_work(
                    info.pixels,
                    len(data),
                    spec.preprocess,
                    data,
                    self._limits,
                    job.params,
                    self._settings.shape_buckets_px,
                ),
            )
            del data
            parameters = dict(prepared.parameters)
            if traceparent := jobs.traceparent_of(delivery.attributes):
                parameters["traceparent"] = traceparent
            inferred = await timer.stage(
                "infer", retry(lambda: self._infer(spec, version, job, prepared, parameters), "infer")
            )
            served = inferred.model_version
            try:
                output_array = inferred.outputs[spec.output.name]
                output_array = output_array[0] if spec.batched else output_array
                # Elements over three: the pixels of an image output, and "few" for any other tensor.
                output = await timer.stage(
                    "postprocess",
                    self._image_work(
                        output_array.size // 3, 0, spec.postprocess, output_array, prepared, job.output_format
                    ),
                )
            finally:
                # The output may be a view of a shared-memory region: hand it back only once encoded.
                inferred.release()
        finally:
            self._pixels.release(held)
        result = self._record(job, delivery, served, JobResult.SUCCEEDED, timer)
        result.fingerprint = fingerprint
        result.output_uri = result_ref(job.output, job.job_id, output.extension).uri
        result.output_shape.extend(output.shape)
        # The write precedes the ack and must survive cancellation, or a durable result could go unrecorded.
        fresh = await timer.stage(
            "write", asyncio.shield(retry(lambda: self._write(job, served, output, result), "write"))
        )
        await timer.stage("ack", self._ack(delivery))
        served_label = self._catalog.version_label(model, served)
        if not fresh:
            log.info("job_already_done", version=served)
            telemetry.JOBS.labels(job.model, served_label, DUPLICATE).inc()
            return DUPLICATE
        telemetry.JOBS.labels(job.model, served_label, SUCCEEDED).inc()
        telemetry.JOB_LATENCY_SECONDS.labels(job.model).observe(max(0.0, time.time() - delivery.publish_time))
        if self._success_log.allow():
            log.info("job_succeeded", version=served, output_uri=result.output_uri, timings_ms=timer.timings_ms)
        return SUCCEEDED

    # -- the stages ----------------------------------------------------------------------------

    async def _fetch(self, job: Job) -> bytes:
        if job.input_bytes is not None:
            telemetry.BYTES_READ.inc(len(job.input_bytes))
            return job.input_bytes
        assert job.input_ref is not None
        return await self._storage.read_input(job.input_ref, self._settings.max_input_bytes)

    async def _infer(
        self, spec: ModelSpec, version: str, job: Job, prepared: Prepared, parameters: dict[str, str]
    ) -> InferResult:
        timeout_s = self._settings.infer_timeout_s
        remaining = job.remaining_s(time.time())
        if remaining is not None:
            if remaining <= 0:
                raise DEADLINE_EXCEEDED
            # Triton drops the request from its queue once the job is worthless.
            timeout_s = min(timeout_s, remaining)
        batch = prepared.array[np.newaxis] if spec.batched else prepared.array
        output_bytes = spec.output_nbytes(prepared)
        admission = self._admission(spec)
        await admission.acquire(batch.shape, job.priority)
        try:
            return await self._stream.infer(
                spec.name,
                version,
                [(spec.input.name, spec.input.wire_dtype, batch)],
                parameters=parameters,
                timeout_s=timeout_s,
                priority=job.priority,
                shm_output=(spec.output.name, output_bytes) if output_bytes else None,
            )
        finally:
            admission.release()

    def _admission(self, spec: ModelSpec) -> Admission:
        admission = self._admissions.get(spec.name)
        if admission is None:
            batch = max(1, spec.max_batch_size)
            limit = max(1, self._settings.triton_queue_batches * batch)
            admission = self._admissions[spec.name] = Admission(batch, limit)
        return admission

    async def _write(self, job: Job, version: str, output: Output, result: JobResult) -> bool:
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
        await self._publish_result(result)
        if not await self._storage.write_once(record, jobs.result_json(result), "application/json", metadata):
            existing = await self._storage.read_json(record)
            if existing is None or not same_job(existing, result.fingerprint):
                raise conflict(job.job_id)  # another job took the name between our look and our write
        return True

    async def _publish_result(self, result: JobResult) -> None:
        # Before the record: a crash in between repeats the notice (at least once) rather than
        # losing it, since a redelivery that finds the record acks without publishing again.
        if self._results is not None:
            await self._results.publish(result)

    async def _ack(self, delivery: Delivery) -> None:
        delivery.ack()

    async def _retry(
        self, step: Callable[[], Awaitable[T]], what: str, on_retry: Callable[[], None] = lambda: None
    ) -> T:
        """``retrying`` with the settings' attempts and backoff."""
        return await retrying(
            step,
            attempts=self._settings.retry_attempts,
            base_s=self._settings.retry_base_s,
            what=what,
            on_retry=on_retry,
        )

    async def _image_work(self, pixels: int, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-bound image work: small images on the event loop, large ones in the thread pool.

        Small means few pixels and few encoded bytes: a file's decode costs CPU in proportion to both
        (a progressive JPEG re-walks its pixels once per scan), and the loop serves every job and probe.

        Measured on the benchmark's 256 px jobs (JPEG decode and encode, 0.9 ms alone): 3.8 to 4.5 ms
        of worker CPU per job with the work inline, 4.7 to 5.1 through the pool (three paired runs of
        1,500 jobs). Each hand-off to a thread and back (a futex wake, an eventfd write, the GIL
        changing hands twice) costs about as much as the work. Large images go to the pool, where a
        JPEG decode or encode runs beside the loop on another core without the GIL; Pillow's PNG and
        WebP encoders hold it, and in the pool pause the loop no longer than inline would.
        """
        if pixels <= self._settings.inline_max_pixels and nbytes <= self._settings.inline_max_bytes:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- outcomes --------------------------------------------------------------------------------

    def _record(self, job: Job | None, delivery: Delivery, version: str, status: int, timer: Timer) -> JobResult:
        return JobResult(
            job_id=job.job_id if job else "",
            status=status,  # type: ignore[arg-type]
            model=job.model if job else "",
            model_version=version,
            timings_ms=timer.timings_ms,
            finished_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            message_id=delivery.message_id,
            delivery_attempt=delivery.delivery_attempt or 0,
            latency_ms=round(max(0.0, time.time() - delivery.publish_time) * 1000, 3),
            traceparent=jobs.traceparent_of(delivery.attributes),
        )

    async def _fail_permanently(
        self,
        delivery: Delivery,
        *,
        message: jobs.ImageJob | None,
        job: Job | None,
        version: str,
        error: PermanentJobError,
        timer: Timer,
    ) -> str:
        result = self._record(job, delivery, version, JobResult.FAILED, timer)
        result.error_code = error.code
        result.error_message = error.message
        if job is None and message is not None:
            result.job_id = message.job_id if jobs.valid_job_id(message.job_id) else ""
            result.model = clip(message.model, 64)
        # A job's own failure is recorded under its name; a message that is no valid job, or that is
        # another job under a taken id, only under _invalid/, where it can shadow no one's record.
        if job is not None and error.code != JOB_ID_CONFLICT:
            ref = record_ref(job.output, job.job_id)
            result.fingerprint = jobs.fingerprint(job)
        else:
            ref = jobs.invalid_record_ref(self._rules, delivery.message_id)
        metadata = {"job_id": result.job_id, "error_code": error.code, "fingerprint": result.fingerprint}

        async def record() -> None:
            if result.job_id and error.code != JOB_ID_CONFLICT:
                # A conflict's notice would reach whoever listens for the other job under this id.
                await self._publish_result(result)
            await self._storage.write_once(ref, jobs.result_json(result), "application/json", metadata)

        try:
            await asyncio.shield(self._retry(record, "write_error_record"))
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
