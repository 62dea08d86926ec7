"""The core path on the real stack: Pub/Sub -> preprocessing -> Triton (one stream) -> GCS -> ack."""

from __future__ import annotations

import asyncio
import io
import re
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from devstack.samples import sample_image
from devstack.stack import Stack
from tests.integration.subscriptions import undelivered
from worker.client import JobClient, build_job
from worker.config import Settings
from worker.jobs import JobResult

pytestmark = pytest.mark.timeout(600)

SIZES = ((64, 48), (96, 96))


def triton_counts(metrics_url: str, model: str) -> tuple[float, float]:
    """Triton's own ``nv_inference_count`` and ``nv_inference_exec_count`` summed over a model's versions."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    totals = {"nv_inference_count": 0.0, "nv_inference_exec_count": 0.0}
    for name in totals:
        for match in re.finditer(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M):
            totals[name] += float(match.group(1))
    return totals["nv_inference_count"], totals["nv_inference_exec_count"]


async def test_200_jobs_end_to_end_with_batching(
    stack: Stack, make_settings: Callable[..., Settings], worker_for: Any
) -> None:
    settings = make_settings(max_in_flight=64, max_messages=128)
    count = 200
    before = triton_counts(stack.triton.metrics_url, "enhance")
    async with JobClient(settings) as client:
        inputs = [
            await client.upload_bytes(sample_image(*SIZES[i % 2], seed=i), f"e2e-{i}.jpg") for i in range(len(SIZES))
        ]
        # The backlog is published before the worker starts, so Triton sees many requests at once.
        jobs = [build_job("enhance", input_uri=inputs[i % 2], job_id=f"e2e-{i:04d}", version="1") for i in range(count)]
        await asyncio.gather(*(client.publish(job) for job in jobs))

        async with worker_for(settings):
            results = await client.wait_many(jobs, timeout_s=300)

        assert [r.status for r in results] == [JobResult.SUCCEEDED] * count
        outputs = await asyncio.gather(*(client.read(r.output_uri) for r in results))
    assert len({r.output_uri for r in results}) == count
    for i, data in enumerate(outputs):
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == SIZES[i % 2]
            assert image.format == "JPEG"
    for result in results:
        assert result.model_version == "1"
        assert set(result.timings_ms) >= {"fetch", "preprocess", "infer", "postprocess", "write"}

    after = triton_counts(stack.triton.metrics_url, "enhance")
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == count
    # The dynamic batcher formed batches: fewer executions than requests.
    assert executions < inferences
    assert undelivered(settings) == 0


async def test_bad_input_is_recorded_and_acked_while_good_jobs_succeed(
    make_settings: Callable[..., Settings], worker_for: Any
) -> None:
    settings = make_settings()
    async with JobClient(settings) as client:
        good_uri = await client.upload_bytes(sample_image(80, 60, seed=1), "good.jpg")
        not_image = await client.upload_bytes(b"this is not an image", "not-image.jpg")
        bad = {
            "unknown_model": build_job("no_such_model", input_uri=good_uri, job_id="bad-model"),
            "input_not_found": build_job(
                "enhance", input_uri=f"gs://{settings.input_bucket}/nope.jpg", job_id="bad-missing"
            ),
            "not_an_image": build_job("enhance", input_uri=not_image, job_id="bad-bytes"),
            "bucket_not_allowed": build_job(
                "enhance", input_uri="gs://someone-elses-bucket/x.jpg", job_id="bad-bucket"
            ),
            "unknown_version": build_job("enhance", input_uri=good_uri, job_id="bad-version", version="99"),
        }
        good = [build_job("enhance", input_uri=good_uri, job_id=f"good-{i}") for i in range(5)]
        for job in bad.values():
            await client.publish(job)
        await client.publish_raw(b"\x00\x01garbage")
        await client.publish_raw(b"{not json")
        for job in good:
            await client.publish(job)

        async with worker_for(settings):
            good_results = await asyncio.gather(*(client.wait(job, timeout_s=120) for job in good))
            bad_results = {code: await client.wait(job, timeout_s=120) for code, job in bad.items()}

    assert all(r.status == JobResult.SUCCEEDED for r in good_results)
    for code, result in bad_results.items():
        assert result.status == JobResult.FAILED
        assert result.error_code == code, (code, result.error_message)
    assert undelivered(settings) == 0


async def test_shared_memory_and_unary_paths_give_the_same_results(
    make_settings: Callable[..., Settings], worker_for: Any
) -> None:
    # Shared memory on and off over the default streams, and on over unary calls.
    pixels: dict[str, list[Any]] = {}
    for mode, triton_mode in (("auto", "stream"), ("off", "stream"), ("auto", "unary")):
        settings = make_settings(shared_memory=mode, triton_mode=triton_mode)
        key = f"shm-{mode}-{triton_mode}"
        async with JobClient(settings) as client:
            uri = await client.upload_bytes(sample_image(200, 120, seed=5), "shm.jpg")
            jobs = [
                build_job("enhance", input_uri=uri, job_id=f"{key}-enhance", version="1", output_format="png"),
                build_job("upscale", input_uri=uri, job_id=f"{key}-upscale", params={"scale": "2"}),
                build_job("embedding", input_uri=uri, job_id=f"{key}-embedding", output_format="npy"),
            ]
            await asyncio.gather(*(client.publish(job) for job in jobs))
            async with worker_for(settings) as worker:
                results = await asyncio.gather(*(client.wait(job, timeout_s=120) for job in jobs))
                used = worker.shm_pool.allocated_bytes if worker.shm_pool else 0
                lanes = worker.stream.lanes
            outputs = [await client.read(r.output_uri) for r in results]
        assert [r.status for r in results] == [JobResult.SUCCEEDED] * 3
        assert (used > 0) == (mode == "auto")
        assert (lanes > 0) == (triton_mode == "stream")
        with Image.open(io.BytesIO(outputs[0])) as enhanced, Image.open(io.BytesIO(outputs[1])) as upscaled:
            assert enhanced.size == (200, 120)
            assert upscaled.size == (400, 240)
            pixels[key] = [np.asarray(enhanced), np.load(io.BytesIO(outputs[2]))]
    # The same results every way: enhance v1 is deterministic, PNG lossless, the embedding exact.
    first, *others = pixels.values()
    for other in others:
        assert np.array_equal(first[0], other[0])
        assert np.array_equal(first[1], other[1])
    assert len(pixels) == 3
