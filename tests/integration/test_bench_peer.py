"""The benchmark's idiomatic peer on the real stack: it writes what the worker writes, and acks a redelivered job."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from bench.peer import Peer
from devstack.samples import sample_image
from devstack.stack import Stack
from tests.integration.subscriptions import undelivered
from worker.client import JobClient, build_job
from worker.config import Settings
from worker.jobs import ImageJob, JobResult

pytestmark = pytest.mark.timeout(600)

JOBS = 4


async def test_the_peer_writes_the_workers_results_and_records_and_acks_a_redelivery(
    stack: Stack, make_settings: Callable[..., Settings], worker_for: Any
) -> None:
    settings = make_settings()
    run = uuid.uuid4().hex[:8]

    def jobs(who: str) -> list[ImageJob]:
        prefix = f"gs://{settings.output_bucket}/{who}-{run}"
        return [build_job("enhance", input_uri=uri, job_id=f"job-{i}", output_prefix=prefix) for i in range(JOBS)]

    async with JobClient(settings) as client:
        uri = await client.upload_bytes(sample_image(96, 64, seed=3), f"peer-{run}.jpg")
        peer_jobs, worker_jobs = jobs("peer"), jobs("worker")
        await asyncio.gather(*(client.publish(job) for job in peer_jobs))
        peer = Peer(settings.project, stack.triton.grpc_url, stack.gcs.url, JOBS)
        future = peer.subscribe(settings.subscription_path)
        try:
            assert await asyncio.to_thread(peer.finished.wait, 120)
            peer_results = await client.wait_many(peer_jobs, timeout_s=60)
            # The same job again: its result exists, so the peer acks it and rewrites nothing.
            await client.publish(peer_jobs[0])
            assert await asyncio.to_thread(peer.wait_for_duplicates, 1, 120)
            again = await client.wait(peer_jobs[0], timeout_s=60)
        finally:
            future.cancel()
            await asyncio.to_thread(future.result)
            peer.close()
        assert (peer.done, again) == (JOBS, peer_results[0])
        assert await asyncio.to_thread(undelivered, settings) == 0

        # A subscription of its own: the emulator keeps the peer's cancelled stream and may push the
        # worker's messages into it for rounds of the ack deadline (real Pub/Sub drops dead streams).
        worker_settings = make_settings()
        async with JobClient(worker_settings) as worker_client:
            await asyncio.gather(*(worker_client.publish(job) for job in worker_jobs))
            async with worker_for(worker_settings):
                worker_results = await worker_client.wait_many(worker_jobs, timeout_s=120)
        outputs = await asyncio.gather(*(client.read(r.output_uri) for r in (*peer_results, *worker_results)))

    for ours, theirs in zip(peer_results, worker_results, strict=True):
        assert ours.status == theirs.status == JobResult.SUCCEEDED
        assert ours.job_id == theirs.job_id
        assert ours.output_uri == theirs.output_uri.replace(f"/worker-{run}/", f"/peer-{run}/")
        assert ours.output_uri.endswith(f"/{ours.job_id}.jpg")
        assert (ours.model, ours.model_version) == (theirs.model, theirs.model_version)
        assert list(ours.output_shape) == list(theirs.output_shape)
        assert set(ours.timings_ms) == set(theirs.timings_ms)
        assert ours.message_id and ours.latency_ms > 0
    for data in outputs:
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.size) == ("JPEG", (96, 64))
