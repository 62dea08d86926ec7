"""The producer's side on the real stack: the client API, the results topic, deadlines and priorities."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from google.api_core.exceptions import DeadlineExceeded
from google.cloud import pubsub_v1

from devstack.samples import sample_image
from devstack.stack import Stack
from tests.integration.test_end_to_end import triton_counts
from worker.client import JobClient, build_job
from worker.config import Settings
from worker.jobs import PRIORITIES, JobResult
from worker.triton import TritonStream

pytestmark = pytest.mark.timeout(300)


def drain_results(settings: Settings, expected: int, deadline_s: float = 60.0) -> list[Any]:
    """Pull the results subscription until ``expected`` messages came and one more pull finds nothing."""
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(settings.project, f"{settings.results_topic}-sub")
    received: list[Any] = []
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline:
            try:
                response = subscriber.pull(request={"subscription": path, "max_messages": 100}, timeout=3)
            except DeadlineExceeded:
                if len(received) >= expected:
                    return received
                continue
            if not response.received_messages:
                if len(received) >= expected:
                    return received
                continue
            received.extend(m.message for m in response.received_messages)
            subscriber.acknowledge(
                request={"subscription": path, "ack_ids": [m.ack_id for m in response.received_messages]}
            )
        return received
    finally:
        subscriber.close()


async def test_results_topic_gets_exactly_one_message_per_job_even_when_redelivered(
    make_settings: Callable[..., Settings], worker_for: Any
) -> None:
    settings = make_settings(results_topic=f"results-{uuid.uuid4().hex[:8]}")
    async with JobClient(settings) as client:
        uri = await client.upload_bytes(sample_image(48, 48), "results.jpg")
        jobs = [build_job("enhance", input_uri=uri, job_id=f"res-{i}") for i in range(6)]
        bad = build_job("enhance", input_uri=f"gs://{settings.input_bucket}/gone.jpg", job_id="res-bad")
        # Every job is delivered twice: Pub/Sub's at-least-once, made certain.
        for job in [*jobs, bad]:
            await client.publish(job)
            await client.publish(job)
        async with worker_for(settings):
            results = await asyncio.gather(*(client.wait(job, timeout_s=120) for job in [*jobs, bad]))
            messages = await asyncio.to_thread(drain_results, settings, len(jobs) + 1)
    assert [r.status for r in results] == [JobResult.SUCCEEDED] * len(jobs) + [JobResult.FAILED]
    per_job = Counter(m.attributes["job_id"] for m in messages)
    assert per_job == {job.job_id: 1 for job in [*jobs, bad]}
    statuses = {m.attributes["job_id"]: m.attributes["status"] for m in messages}
    assert statuses["res-bad"] == "FAILED"
    assert statuses["res-0"] == "SUCCEEDED"
    assert {m.attributes["model"] for m in messages} == {"enhance"}


async def test_an_expired_job_is_recorded_without_reaching_triton(
    stack: Stack, make_settings: Callable[..., Settings], worker_for: Any
) -> None:
    settings = make_settings()
    async with JobClient(settings) as client:
        uri = await client.upload_bytes(sample_image(48, 48), "expired.jpg")
        expired = build_job("style_aged", input_uri=uri, job_id="expired-1", deadline=_past())
        before = triton_counts(stack.triton.metrics_url, "style_aged")
        await client.publish(expired)
        async with worker_for(settings):
            result = await client.wait(expired, timeout_s=60)
            # A job with time to spare goes through; its remaining time is its Triton timeout.
            alive = build_job("enhance", input_uri=uri, job_id="expired-2", timeout_s=120, priority="high")
            await client.publish(alive)
            assert (await client.wait(alive, timeout_s=60)).status == JobResult.SUCCEEDED
    assert result.status == JobResult.FAILED
    assert result.error_code == "deadline_exceeded"
    assert triton_counts(stack.triton.metrics_url, "style_aged") == before


def _past() -> Any:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) - timedelta(seconds=5)


async def test_priority_reaches_tritons_scheduler(stack: Stack) -> None:
    """A high-priority request written after a queue of low ones is served ahead of most of them."""
    stream = TritonStream(stack.triton.grpc_url, request_timeout_s=120)
    await stream.start()
    image = np.asarray(np.random.default_rng(0).integers(0, 255, (1, 384, 384, 3)), dtype=np.uint8)
    finished: list[str] = []

    async def one(name: str, priority: int) -> None:
        await stream.infer("enhance", "1", [("image", "UINT8", image)], priority=priority)
        finished.append(name)

    try:
        # Tasks start in creation order, so every low request is queued on the stream before the high one.
        lows = [asyncio.create_task(one(f"low-{i}", PRIORITIES["low"])) for i in range(48)]
        high = asyncio.create_task(one("high", PRIORITIES["high"]))
        await asyncio.gather(*lows, high)
    finally:
        await stream.stop()
    # Without priorities it would finish last; with them it joins the next batch that forms.
    assert finished.index("high") < len(lows) // 2, finished


async def test_publish_a_directory_with_the_cli_and_wait(
    stack: Stack, make_settings: Callable[..., Settings], worker_for: Any, tmp_path: Any
) -> None:
    settings = make_settings()
    for i in range(5):
        (tmp_path / f"photo-{i}.jpg").write_bytes(sample_image(40, 30, seed=i))
    (tmp_path / "notes.txt").write_text("not an image, and not picked up")
    env = {**os.environ, **stack.environment(settings)}
    async with worker_for(settings):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker.cli", "publish", str(tmp_path), "--model", "enhance", "--wait",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = output.decode()
    assert proc.returncode == 0, text
    assert "5 succeeded, 0 failed" in text
    assert "latency p50" in text
