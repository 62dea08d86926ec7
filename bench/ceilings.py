"""The ceilings: each component the job touches, driven alone as hard as the worker drives it.

- ``infer_ceiling``: the job's tensors streamed straight to Triton through the
  worker's own ``TritonStream``, at the worker's concurrency, with no queue and
  no storage: the most the (simulated) GPU takes on this machine.
- ``storage_ceiling``: the job's storage pattern alone (one input read, the
  result write, the record write, through ``worker.storage``) at the worker's
  concurrency against the same GCS emulator.
- ``pubsub_ceiling``: streaming pull and ack alone, through the worker's own
  ``Consumer`` with its flow control, of messages published ahead.

Each returns a rate per second measured from its first operation to its last.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from google.cloud import pubsub_v1
from numpy.typing import NDArray

from bench.sim_model import MODEL_NAME
from worker.consumer import Consumer, Delivery
from worker.jobs import GcsRef, JobResult, parse_gs_uri, result_json
from worker.storage import Storage
from worker.triton import TritonStream

#: Seconds the infer ceiling's first request may take (connecting included).
CONNECT_TIMEOUT_S = 30.0


async def _drive(count: int, concurrency: int, one: Callable[[int], Any], progress: Callable[[int], None]) -> float:
    """Run ``one(i)`` for ``i < count`` with ``concurrency`` at a time; returns operations per second."""
    indices = iter(range(count))

    async def lane() -> None:
        for i in indices:  # a shared iterator: each index is taken once
            await one(i)
            progress(1)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


async def infer_ceiling(
    triton_url: str,
    arrays: Sequence[NDArray[Any]],
    count: int,
    concurrency: int,
    progress: Callable[[int], None],
) -> float:
    """Inferences per second of ``count`` requests, one image each, ``concurrency`` in flight."""
    stream = TritonStream(triton_url, request_timeout_s=60.0)
    await stream.start()
    try:
        batches = [np.ascontiguousarray(a[np.newaxis]) for a in arrays]
        # Warm-up: opens the stream (or the channel) before the clock starts.
        await asyncio.wait_for(stream.infer(MODEL_NAME, "", [("image", "UINT8", batches[0])]), CONNECT_TIMEOUT_S)

        async def one(i: int) -> None:
            await stream.infer(MODEL_NAME, "", [("image", "UINT8", batches[i % len(batches)])])

        return await _drive(count, concurrency, one, progress)
    finally:
        await stream.stop()


def sample_record(job_id: str) -> bytes:
    """A result record the size of the worker's, for the storage ceiling's record write."""
    record = JobResult(
        job_id=job_id,
        status=JobResult.SUCCEEDED,
        model=MODEL_NAME,
        model_version="1",
        output_uri=f"gs://tritonq-results/results/{job_id}.jpg",
        timings_ms={"fetch": 3.2, "preprocess": 1.1, "infer": 80.5, "postprocess": 0.9, "write": 4.4},
        finished_at="2026-01-01T00:00:00.000Z",
        message_id="1234567890",
        delivery_attempt=1,
        latency_ms=123.4,
    )
    record.output_shape.extend([256, 256, 3])
    return result_json(record)


async def storage_ceiling(
    input_uris: Sequence[str],
    *,
    output: bytes,
    buckets: Sequence[str],
    count: int,
    concurrency: int,
    progress: Callable[[int], None],
) -> float:
    """Jobs' storage patterns per second: read an input, write a result and its record (create-only).

    Job ``i`` writes to ``buckets[i % n]``, as the benchmark's runs do (``workload.OUTPUT_BUCKETS_PER_RUN``).
    """
    storage = Storage()
    await storage.start()
    try:
        refs = [parse_gs_uri(uri) for uri in input_uris]

        async def one(i: int) -> None:
            job_id = f"ceiling-{i:05d}"
            bucket = buckets[i % len(buckets)]
            metadata = {"job_id": job_id, "model": MODEL_NAME, "model_version": "1"}
            await storage.read_input(refs[i % len(refs)], 1 << 30)
            await storage.write_once(GcsRef(bucket, f"ceiling/{job_id}.jpg"), output, "image/jpeg", metadata)
            await storage.write_once(
                GcsRef(bucket, f"ceiling/{job_id}.json"), sample_record(job_id), "application/json", metadata
            )

        return await _drive(count, concurrency, one, progress)
    finally:
        await storage.close()


async def pubsub_ceiling(
    subscription_path: str, count: int, max_messages: int, progress: Callable[[int], None], timeout_s: float
) -> float:
    """Messages per second pulled and acked through the worker's ``Consumer``, ``max_messages`` held at once."""
    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    consumer = Consumer(subscription_path, queue, max_messages=max_messages, max_bytes=10**9, max_lease_duration_s=600)
    times: list[float] = []
    try:
        async with consumer, asyncio.timeout(timeout_s):
            while len(times) < count:
                delivery = await queue.get()
                delivery.ack()
                times.append(time.perf_counter())
                progress(1)
    except TimeoutError:
        raise TimeoutError(f"pubsub ceiling: {len(times)}/{count} messages in {timeout_s:.0f} s") from None
    first, last = times[0], times[count - 1]
    # The first message's own pull is not timed: rate over the count - 1 intervals.
    return (count - 1) / (last - first)


async def pubsub_delivery_ms(
    topic_path: str, subscription_path: str, count: int, rate_per_s: float, timeout_s: float
) -> list[float]:
    """Milliseconds from publish (the emulator's publish time) to the worker's ``Consumer`` handing it out.

    The part of a quiet system's latency that no worker can remove: Pub/Sub delivering the message.
    """
    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    consumer = Consumer(subscription_path, queue, max_messages=64, max_bytes=10**9, max_lease_duration_s=600)
    publisher = pubsub_v1.PublisherClient(batch_settings=pubsub_v1.types.BatchSettings(max_latency=0))
    delays: list[float] = []

    async def receive() -> None:
        while len(delays) < count:
            delivery = await queue.get()
            delays.append((time.time() - delivery.publish_time) * 1000)
            delivery.ack()

    try:
        async with consumer, asyncio.timeout(timeout_s):
            receiver = asyncio.create_task(receive())
            try:
                await asyncio.sleep(1.0)  # let the streaming pull open before the first message
                for i in range(count):
                    await asyncio.to_thread(publisher.publish(topic_path, f"probe-{i}".encode()).result, 30)
                    await asyncio.sleep(1.0 / rate_per_s)
                await receiver
            finally:
                receiver.cancel()
    except TimeoutError:
        raise TimeoutError(f"pubsub delivery: {len(delays)}/{count} messages in {timeout_s:.0f} s") from None
    finally:
        publisher.stop()
    return delays
