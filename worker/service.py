"""The running worker: wires Triton, storage, the pipeline, the consumer and the HTTP server, and stops them in order.

Start order: HTTP server (so probes answer), Triton stream and catalog,
storage, pipeline workers, and last the consumer, so nothing is pulled before
it can be processed. Stop order, one guarded method:

    stop taking messages -> drain in-flight jobs within the grace period -> nack the unfinished
    -> wait for the acks to be sent and close the subscriber -> close the Triton stream -> flush the results
    topic -> close storage -> HTTP server

Signals are not handled here; ``cli.py`` turns SIGTERM into ``request_stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

import structlog

from worker import telemetry
from worker.catalog import Catalog
from worker.config import Settings, available_cpus
from worker.consumer import Consumer, Delivery
from worker.errors import TransientError
from worker.images import configure_pillow
from worker.pipeline import Pipeline
from worker.results import ResultsPublisher
from worker.scheduling import DeliveryQueue
from worker.server import HttpServer
from worker.shm import ShmPool
from worker.storage import Storage
from worker.triton import TritonControl, TritonStream

log = structlog.get_logger(__name__)

#: Seconds between catalog refreshes in the background, so versions loaded or
#: unloaded in Triton are picked up even when no job misses.
CATALOG_REFRESH_S = 30.0
#: Bytes of shared-memory regions the worker keeps registered with Triton: enough for the tensors of
#: many jobs in flight, small against the pod's memory (README Security counts it).
SHARED_MEMORY_MAX_BYTES = 256 * 1024 * 1024


class Worker:
    """``run()`` serves until ``request_stop()``; every task it starts, it owns and joins."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queue: asyncio.Queue[Delivery] = DeliveryQueue(maxsize=settings.max_messages)
        self.executor = ThreadPoolExecutor(max_workers=available_cpus(), thread_name_prefix="image")
        self.control = TritonControl(settings.triton_url)
        self.catalog = Catalog(self.control)
        self.stream = TritonStream(settings.triton_url, mode=settings.triton_mode)
        self.storage = Storage()
        self.shm_pool: ShmPool | None = None
        self.results = ResultsPublisher(settings.results_topic_path) if settings.results_topic else None
        self.pipeline = Pipeline(settings, self.stream, self.catalog, self.storage, self.executor, results=self.results)
        self.consumer = Consumer(
            settings.subscription_path,
            self.queue,
            max_messages=settings.max_messages,
            max_bytes=settings.max_bytes,
            give_up_after_s=settings.pubsub_give_up_s,
            on_give_up=self._consumer_gave_up,
        )
        self.http = HttpServer(settings.http_port, self.readiness, self._before_scrape, self.liveness)
        self._stop_requested = asyncio.Event()
        self._stopping = False
        self._started = False
        #: Set once the probes answer, and once the consumer pulls (the worker is serving).
        self.listening = asyncio.Event()
        self.serving = asyncio.Event()

    def request_stop(self) -> None:
        self._stop_requested.set()

    @property
    def failure(self) -> str | None:
        """Why the worker stopped on its own (the consumer gave up), else ``None``."""
        return self.consumer.failure

    def _consumer_gave_up(self, reason: str) -> None:
        log.error("worker_exiting", reason=f"pubsub subscription failing: {reason}")
        self.request_stop()

    def liveness(self) -> str | None:
        """``None`` while the worker can still do its work; a consumer that gave up cannot."""
        if self.consumer.failure is not None:
            return f"consumer gave up: {self.consumer.failure}"
        return None

    async def readiness(self) -> str | None:
        if self._stopping or self._stop_requested.is_set():
            return "shutting down"
        if not self._started:
            return "starting"
        if not await self.control.server_ready():
            return "triton is not ready"
        if not self.consumer.running:
            return "consumer is not pulling"
        for model in self.catalog.models:
            if not await self.control.model_ready(model):
                return f"model {model} is not ready"
        return None

    def _before_scrape(self) -> None:
        telemetry.OLDEST_MESSAGE_AGE.set(self.consumer.oldest_age_s())
        telemetry.TRITON_IN_FLIGHT.set(self.stream.in_flight)

    async def run(self) -> None:
        """Serve until ``request_stop()``, then stop in order."""
        if self._started:
            raise RuntimeError("Worker already ran")
        configure_pillow(self.settings.max_input_pixels)
        await self.http.start()
        self.listening.set()
        workers: asyncio.Task[None] | None = None
        refresher: asyncio.Task[None] | None = None
        try:
            await self._wait_for_triton()
            await self._enable_shared_memory()
            await self.stream.start()
            await self.storage.start()
            if self.results is not None:
                self.results.start()
            workers = asyncio.create_task(
                self.pipeline.run_workers(self.queue, self.settings.max_in_flight), name="pipeline"
            )
            refresher = asyncio.create_task(self._refresh_catalog(), name="catalog-refresh")
            self.consumer.start()
            self._started = True
            self.serving.set()
            log.info(
                "worker_started",
                subscription=self.settings.subscription_path,
                models={m: sorted(v) for m, v in self.catalog.models.items()},
                http_port=self.http.port,
            )
            await self._stop_requested.wait()
        finally:
            await self._shutdown(workers, refresher)

    async def _wait_for_triton(self) -> None:
        """Block until Triton answers and the catalog is read: the pod is not ready before that."""
        delay = 0.1
        while not self._stop_requested.is_set():
            if await self.control.server_ready():
                await self.catalog.refresh()
                return
            log.info("waiting_for_triton", url=self.settings.triton_url)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay)
            delay = min(delay * 2, 5.0)

    async def _enable_shared_memory(self) -> None:
        if self.settings.shared_memory == "off":
            return
        pool = ShmPool(self.control, max_bytes=SHARED_MEMORY_MAX_BYTES)
        if await pool.probe():
            self.shm_pool = self.stream.shm_pool = pool
            log.info("shared_memory_enabled", max_bytes=SHARED_MEMORY_MAX_BYTES)
        else:
            await pool.close()
            log.info("shared_memory_unavailable", reason="triton cannot map the worker's regions")

    async def _refresh_catalog(self) -> None:
        while True:
            await asyncio.sleep(CATALOG_REFRESH_S)
            try:
                await self.catalog.refresh()
            except TransientError as exc:
                log.warning("catalog_refresh_failed", error=str(exc))

    async def _shutdown(self, workers: asyncio.Task[None] | None, refresher: asyncio.Task[None] | None) -> None:
        if self._stopping:
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_s
        log.info("worker_stopping", in_flight=self.pipeline.in_flight, grace_s=grace)
        # 1. Stop taking work: what arrives now goes back at once; what was handed out stays leased.
        self.consumer.stop_pulling()
        # 2. Drain: let the workers finish what is queued and in flight, within the grace period.
        nacked = 0
        if workers is not None:
            try:
                await asyncio.wait_for(self._drained(), grace)
            except TimeoutError:
                log.warning("grace_period_over", in_flight=self.pipeline.in_flight)
            # 3. Cancel what is left: the pipeline nacks each job it cancels.
            workers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await workers
        while not self.queue.empty():
            self.queue.get_nowait().nack()
            nacked += 1
        nacked += self.consumer.nack_held()
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        # 4. Flush acks and nacks, close the subscriber.
        await self.consumer.wait_closed()
        # 5. Close the clients, then the probes.
        await self.stream.stop()
        if self.shm_pool is not None:
            await self.shm_pool.close()
        if self.results is not None:
            await self.results.stop()
        await self.storage.close()
        await self.control.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        await self.http.stop()
        log.info("worker_stopped", nacked=nacked)

    async def _drained(self) -> None:
        await self.queue.join()
