"""The Pub/Sub fault scenarios: the worker pulls through ``PubsubProxy``, which plays what the real service does.

Each runs ``tritonq run`` with ``PUBSUB_EMULATOR_HOST`` pointing at the proxy
(the harness publishes and reads results around it) and accounts for every
job from GCS as the other scenarios do. Subscriptions have no dead-letter
policy: with one, the emulator never redelivers a message nacked after its
stream ended (``worker/provision.py: provision_pubsub``), which these scenarios
end on purpose; the service does.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from chaos.accounting import Report
from chaos.harness import Run
from chaos.pubsub_proxy import PubsubFaults, PubsubProxy
from chaos.scenarios import EXIT_SLACK_S, settle_timeout_s
from devstack.stack import Stack
from devstack.worker_process import WorkerProcess

#: Seconds the NOT_FOUND scenario lets the worker keep failing before it must give up (its ``pubsub_give_up_s``).
GIVE_UP_S = 20.0


async def _serve(run: Run, worker: WorkerProcess, jobs: int) -> tuple[float, int]:
    """Start ``worker``, wait until every job is accounted for; returns the seconds it took from ready and its exit."""
    worker.start()
    await asyncio.to_thread(worker.wait_ready, settle_timeout_s(jobs))
    ready_at = time.monotonic()
    await run.settle(settle_timeout_s(jobs), alive=worker)
    serving_s = time.monotonic() - ready_at
    code, _ = await asyncio.to_thread(worker.terminate, 60)
    return serving_s, code


async def through_proxy(
    stack: Stack, workdir: Path, name: str, faults: PubsubFaults, *, jobs: int = 500, seed: int = 7
) -> Report:
    """``jobs`` good jobs pulled through the proxy playing ``faults``; every one must succeed, once."""
    proxy = PubsubProxy(stack.pubsub.host, faults, seed=seed)
    proxy.start()
    try:
        run = Run(stack, name, workdir, dead_letter=False)
        await run.publish_good(jobs, seed)
        worker = run.worker(PUBSUB_EMULATOR_HOST=proxy.host)
        started = time.monotonic()
        try:
            worker.start()
            await run.wait_progress(1, settle_timeout_s(jobs) + faults.deny_for_s, alive=worker)
            first_s = time.monotonic() - started
            await run.settle(settle_timeout_s(jobs), alive=worker)
            settled_s = time.monotonic() - started
            code, _ = await asyncio.to_thread(worker.terminate, 60)
        finally:
            run.stop_workers()
    finally:
        proxy.stop()
    restarts = sum(1 for line in worker.log_lines() if line.get("message") == "pubsub_subscription_failed")
    return await run.report(
        first_success_s=round(first_s, 1),
        jobs_per_s=round(jobs / settled_s, 1),
        resubscribed=restarts,
        proxy=dict(proxy.counts),
        last_exit_code=code,
    )


async def streams_closed(
    stack: Stack, workdir: Path, *, jobs: int = 500, every_s: float = 2.0, seed: int = 8
) -> Report:
    """Every streaming pull ended with UNAVAILABLE every ``every_s``; throughput against the same run without proxy."""
    baseline = Run(stack, "pubsub_baseline", workdir, dead_letter=False)
    await baseline.publish_good(jobs, seed)
    try:
        direct_s, _ = await _serve(baseline, baseline.worker(), jobs)
    finally:
        baseline.stop_workers()
    proxy = PubsubProxy(stack.pubsub.host, PubsubFaults(close_streams_every_s=every_s), seed=seed)
    proxy.start()
    try:
        run = Run(stack, "pubsub_streams_closed", workdir, dead_letter=False)
        await run.publish_good(jobs, seed)
        worker = run.worker(PUBSUB_EMULATOR_HOST=proxy.host)
        try:
            proxied_s, code = await _serve(run, worker, jobs)
        finally:
            run.stop_workers()
    finally:
        proxy.stop()
    direct = jobs / direct_s
    proxied = jobs / proxied_s
    return await run.report(
        jobs_per_s=round(proxied, 1),
        jobs_per_s_without_proxy=round(direct, 1),
        throughput_ratio=round(proxied / direct, 2),
        proxy=dict(proxy.counts),
        last_exit_code=code,
    )


async def not_found(stack: Stack, workdir: Path, *, jobs: int = 500, give_up_s: float = GIVE_UP_S) -> Report:
    """NOT_FOUND forever: ``tritonq run`` exits non-zero within ``give_up_s``; a worker without proxy then drains."""
    proxy = PubsubProxy(stack.pubsub.host, PubsubFaults(not_found=True))
    proxy.start()
    try:
        run = Run(stack, "pubsub_not_found", workdir, dead_letter=False, pubsub_give_up_s=give_up_s)
        await run.publish_good(jobs, seed=9)
        failing = run.worker("through-proxy", PUBSUB_EMULATOR_HOST=proxy.host)
        drainer = run.worker("direct")
        try:
            failing.start()
            # Triton's readiness comes first; the window starts with the first subscription.
            code, exit_s = await asyncio.to_thread(failing.wait_exit, give_up_s + settle_timeout_s(0) + EXIT_SLACK_S)
            serving_s, drain_code = await _serve(run, drainer, jobs)
        finally:
            run.stop_workers()
    finally:
        proxy.stop()
    lines = failing.log_lines()
    gave_up = [line for line in lines if line.get("message") == "consumer_gave_up"]
    first_failure = next((line for line in lines if line.get("message") == "pubsub_subscription_failed"), None)
    return await run.report(
        exit_code=code,
        exit_s=round(exit_s, 1),
        give_up_s=give_up_s,
        failing_for_s=gave_up[-1].get("failing_for_s") if gave_up else None,
        gave_up_reason=gave_up[-1].get("reason") if gave_up else None,
        first_failure_code=first_failure.get("code") if first_failure else None,
        drained_s=round(serving_s, 1),
        drain_exit_code=drain_code,
        proxy=dict(proxy.counts),
    )
