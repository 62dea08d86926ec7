"""What an operator sees: metrics that move by exactly the jobs run, probes, and JSON logs with the job's fields."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.probe import free_port
from devstack.samples import sample_image
from devstack.stack import Stack
from devstack.worker_process import WorkerProcess
from worker.client import JobClient, build_job
from worker.config import Settings
from worker.jobs import JobResult

pytestmark = pytest.mark.timeout(300)
STAGES = ("fetch", "preprocess", "infer", "postprocess", "write")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def http_status(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_metrics_move_by_exactly_the_jobs_run(make_settings: Callable[..., Settings], worker_for: Any) -> None:
    settings = make_settings()
    per_version = {"1": 7, "2": 5}
    async with JobClient(settings) as client:
        uri = await client.upload_bytes(sample_image(64, 64), "metrics.jpg")
        jobs = [
            build_job("enhance", input_uri=uri, job_id=f"metrics-{version}-{i}", version=version)
            for version, count in per_version.items()
            for i in range(count)
        ]
        bad = build_job("enhance", input_uri=f"gs://{settings.input_bucket}/missing.jpg", job_id="metrics-missing")
        async with worker_for(settings) as worker:
            before = await asyncio.to_thread(scrape, worker.http.port)
            await asyncio.gather(*(client.publish(job) for job in [*jobs, bad]))
            results = await asyncio.gather(*(client.wait(job, timeout_s=120) for job in [*jobs, bad]))
            after = await asyncio.to_thread(scrape, worker.http.port)
    assert [r.status for r in results[:-1]] == [JobResult.SUCCEEDED] * len(jobs)
    assert results[-1].error_code == "input_not_found"

    for version, count in per_version.items():
        labels = {"model": "enhance", "version": version, "outcome": "succeeded"}
        assert delta(before, after, "tritonq_jobs_total", **labels) == count
    assert delta(before, after, "tritonq_failures_total", reason="input_not_found") == 1
    total = sum(per_version.values())
    for stage in STAGES:
        # The missing input failed in fetch: that stage ran once more than the others.
        expected = total + 1 if stage == "fetch" else total
        assert delta(before, after, "tritonq_stage_seconds_count", stage=stage, model="enhance") == expected, stage
    assert delta(before, after, "tritonq_job_latency_seconds_count", model="enhance") == total
    assert delta(before, after, "tritonq_bytes_written_total") > 0
    assert after[("tritonq_jobs_in_flight", frozenset())] == 0


async def test_readyz_follows_triton_and_shutdown(make_settings: Callable[..., Settings], worker_for: Any) -> None:
    # Before Triton answers: the worker is alive but not ready.
    nowhere = make_settings(triton_url=f"127.0.0.1:{free_port()}", shutdown_grace_s=1.0)
    from worker.service import Worker

    waiting = Worker(nowhere)
    task = asyncio.create_task(waiting.run())
    await asyncio.wait_for(waiting.listening.wait(), 30)
    status, body = await asyncio.to_thread(http_status, f"http://127.0.0.1:{waiting.http.port}/readyz")
    assert status == 503
    assert body["reason"] == "starting"
    status, _ = await asyncio.to_thread(http_status, f"http://127.0.0.1:{waiting.http.port}/healthz")
    assert status == 200
    waiting.request_stop()
    await asyncio.wait_for(task, 30)

    # Serving: ready. Stopping: not ready from the moment the stop is asked for. (Asked here, not over
    # HTTP: an idle worker stops in milliseconds, and its probes stop answering with it.)
    async with worker_for(make_settings()) as worker:
        status, body = await asyncio.to_thread(http_status, f"http://127.0.0.1:{worker.http.port}/readyz")
        assert (status, body["status"]) == (200, "ready")
        worker.request_stop()
        assert await worker.readiness() == "shutting down"


async def test_a_worker_whose_subscription_keeps_failing_gives_up(make_settings: Callable[..., Settings]) -> None:
    from worker.service import Worker

    settings = make_settings(pubsub_give_up_s=3.0)
    missing = settings.model_copy(update={"subscription": settings.subscription + "-deleted"})
    worker = Worker(missing)
    # The worker ends on its own: the consumer retried NOT_FOUND for the window, then gave up.
    await asyncio.wait_for(worker.run(), 120)
    assert worker.failure is not None and "NOT_FOUND" in worker.failure
    assert worker.liveness() == f"consumer gave up: {worker.failure}"


def test_every_log_line_of_a_job_is_json_with_its_fields(
    stack: Stack, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    env = {**stack.environment(settings), "TRITONQ_LOG_FORMAT": "json"}
    log_path = tmp_path / "worker.log"

    async def publish_and_wait() -> list[JobResult]:
        async with JobClient(settings) as client:
            uri = await client.upload_bytes(sample_image(32, 32), "logs.jpg")
            good = build_job("enhance", input_uri=uri, job_id="logs-good", version="1")
            bad = build_job("enhance", input_uri=f"gs://{settings.input_bucket}/nope.jpg", job_id="logs-bad")
            await client.publish(good, {"traceparent": TRACEPARENT})
            await client.publish(bad)
            return [await client.wait(good, timeout_s=120), await client.wait(bad, timeout_s=120)]

    worker = WorkerProcess(env, log_path)
    worker.start()
    try:
        good, bad = asyncio.run(publish_and_wait())
    finally:
        code, _ = worker.terminate(60)
    assert code == 0
    assert good.traceparent == TRACEPARENT
    assert bad.error_code == "input_not_found"

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert all({"severity", "message", "time"} <= line.keys() for line in lines)
    job_lines = [line for line in lines if line.get("job_id") in ("logs-good", "logs-bad")]
    assert {line["message"] for line in job_lines} >= {"job_succeeded", "job_failed"}
    for line in job_lines:
        assert {"job_id", "message_id", "model", "delivery_attempt"} <= line.keys(), line
    succeeded = next(line for line in job_lines if line["message"] == "job_succeeded")
    assert succeeded["version"] == "1"
    assert succeeded["logging.googleapis.com/trace"].endswith("/traces/0af7651916cd43dd8448eb211c80319c")
    failed = next(line for line in job_lines if line["message"] == "job_failed")
    assert failed["severity"] == "WARNING"
    assert failed["reason"] == "input_not_found"
