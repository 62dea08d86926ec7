"""The fault scenarios, each a coroutine that runs on the real stack and returns its ``Report``.

The worker SIGKILLed, Triton restarted, storage cut, bad input, SIGTERM mid-run, and a backlog.

Sizes are arguments: ``python -m chaos`` runs the full ones (1,000 jobs and
three SIGKILLs, a 5,000-message backlog), ``tests/integration/test_faults.py``
the same code with small ones. Faults are triggered by progress (a share of
the jobs succeeded, read from GCS) plus a random delay, so they land while
jobs are in flight, and every wait has a deadline. Every scenario stops what
it started, whatever happens.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import urllib.request
from pathlib import Path
from typing import Any

from chaos.accounting import Report
from chaos.bad_inputs import HealthProbe
from chaos.bad_messages import BAD_KINDS
from chaos.harness import Run
from chaos.proxy import FaultProxy
from devstack.components import Triton
from devstack.stack import Stack
from worker.consumer import LEASE_EXTENSION_S

#: Seconds a worker gets to exit after SIGTERM beyond its grace period: the
#: interpreter's own exit (threads, gRPC channels) on a loaded 2-core machine.
EXIT_SLACK_S = 10.0


def settle_timeout_s(jobs: int) -> float:
    """A generous deadline for ``jobs`` to finish on 2 cores, redeliveries included."""
    return 90.0 + jobs * 0.15


#: Chance that a batch of orphaned messages is still undelivered when ``orphan_allowance_s`` runs out.
ORPHAN_MISS_ODDS = 1e-4


def orphan_allowance_s(dead_streams: int) -> float:
    """Extra seconds a scenario waits for the messages of killed workers, given how the emulator redelivers them.

    Google's emulator (0.8.20, ``google-cloud-cli-pubsub-emulator`` 528) does
    not learn that a streaming pull has ended: a connection dropped by a
    SIGKILL leaves no trace in its log, and a stream the client cancels makes
    its gRPC layer throw ``NoSuchMethodError`` in ``onRstStreamRead``. The
    dead stream stays on its books, and each time a message's ack deadline
    (``LEASE_EXTENSION_S``) runs out the message is sent on one stream chosen
    among all, dead ones included, where it waits out another deadline. Measured:
    in 7 runs of the test (120 jobs, three SIGKILLs), the last worker's first
    job came 8 to 79 s after it started, always on the 10 s beat; an eighth
    run still missed 9 jobs when its 108 s deadline ran out, and a CI run 1.
    Real Pub/Sub redelivers an expired message to a live stream.

    With ``dead_streams`` dead and one live, a batch misses the live stream
    with odds ``d / (d + 1)`` per deadline: this allows the rounds that bring
    those odds under ``ORPHAN_MISS_ODDS`` (33 rounds, 330 s, for three). It
    costs time only when the emulator is unlucky; a settled run stops waiting.
    """
    if dead_streams <= 0:
        return 0.0
    rounds = math.ceil(math.log(ORPHAN_MISS_ODDS) / math.log(dead_streams / (dead_streams + 1)))
    return rounds * float(LEASE_EXTENSION_S)


def fault_point(jobs: int) -> int:
    """Successes after which a mid-run fault strikes: early, since they are counted by listing the bucket
    and the worker may finish dozens of jobs between two listings (30 to 60 here). Struck at a quarter,
    a 120-job run was once inferred to its end before Triton was killed, and the outage went unfelt."""
    return max(1, jobs // 10)


async def worker_killed(stack: Stack, workdir: Path, *, jobs: int = 1000, kills: int = 3, seed: int = 1) -> Report:
    """Scenario 1: SIGKILL the worker ``kills`` times at random moments while ``jobs`` run; restart it each time."""
    rng = random.Random(seed)
    # Without a dead-letter policy: with one, the emulator never redelivers a message
    # orphaned twice (redelivered after one kill, its holder killed again); see worker/provision.py.
    run = Run(stack, "worker_killed", workdir, dead_letter=False, max_in_flight=32, max_messages=64)
    await run.publish_good(jobs, seed)
    # Kill points: random shares of the run, apart from each other, all before the end.
    thresholds = sorted(rng.uniform(0.1, 0.8) for _ in range(kills))
    worker = run.worker()
    kill_log: list[dict[str, float]] = []
    try:
        worker.start()
        await asyncio.to_thread(worker.wait_ready)
        done = 0
        for threshold in thresholds:
            # Kill only a worker that is working: past the threshold and past its own first job, but
            # never wait for more than the run holds (a fast worker may finish the jobs between two kills).
            target = min(max(int(threshold * jobs), done + 1), jobs - 1)
            wait_s = settle_timeout_s(jobs) + orphan_allowance_s(len(kill_log))
            await run.wait_progress(target, wait_s, alive=worker)
            await asyncio.sleep(rng.uniform(0.0, 0.2))  # a random moment, not a stage boundary
            done = await run.succeeded()
            worker.kill()
            kill_log.append({"after_succeeded": done})
            worker.start()
            await asyncio.to_thread(worker.wait_ready)
        last_start = time.monotonic()
        await run.settle(settle_timeout_s(jobs) + orphan_allowance_s(kills), alive=worker)
        settled_s = time.monotonic() - last_start
        code, _ = await asyncio.to_thread(worker.terminate, 60)
    finally:
        run.stop_workers()
    return await run.report(kills=kill_log, last_worker_settled_s=round(settled_s, 1), last_exit_code=code)


async def triton_restarted(stack: Stack, workdir: Path, triton: Triton, *, jobs: int = 300, seed: int = 2) -> Report:
    """Scenario 2: kill Triton mid-run and start it again on the same ports; nothing may be lost."""
    run = Run(stack, "triton_restarted", workdir, triton_url=triton.grpc_url)
    await run.publish_good(jobs, seed)
    worker = run.worker()
    try:
        worker.start()
        await asyncio.to_thread(worker.wait_ready)
        await run.wait_progress(fault_point(jobs), settle_timeout_s(jobs), alive=worker)
        done_at_kill = await run.succeeded()
        triton.kill()
        restart_started = asyncio.get_running_loop().time()
        await asyncio.to_thread(triton.start)
        restart_s = asyncio.get_running_loop().time() - restart_started
        await run.settle(settle_timeout_s(jobs), alive=worker)
        alive = worker.running
        code, _ = await asyncio.to_thread(worker.terminate, 60)
    finally:
        run.stop_workers()
        if not triton.running:
            triton.start()
    # The outage was felt: inference failed and was retried (or nacked), in either Triton mode.
    felt = sum(
        1
        for line in worker.log_lines()
        if (line.get("message") == "retrying" and line.get("step") == "infer")
        or (line.get("message") == "job_nacked" and line.get("reason") == "transient")
    )
    return await run.report(
        succeeded_at_kill=done_at_kill,
        triton_down_s=round(restart_s, 1),
        infer_failures=felt,
        worker_survived=alive,
        last_exit_code=code,
    )


async def storage_outage(
    stack: Stack, workdir: Path, *, jobs: int = 300, outage_s: float = 10.0, seed: int = 3
) -> Report:
    """Scenario 3: storage unreachable for ``outage_s`` mid-run (connections refused and reset), then back."""
    host, _, port = stack.gcs.url.removeprefix("http://").partition(":")
    proxy = FaultProxy(host, int(port))
    proxy.start()
    try:
        run = Run(stack, "storage_outage", workdir, storage_url=proxy.url)
        await run.publish_good(jobs, seed)
        worker = run.worker()
        try:
            worker.start()
            await asyncio.to_thread(worker.wait_ready)
            await run.wait_progress(fault_point(jobs), settle_timeout_s(jobs), alive=worker)
            done_at_cut = await run.succeeded()
            proxy.cut()
            loop = asyncio.get_running_loop()
            cut_at = loop.time()
            # The outage is the fault itself, not a synchronisation guess: storage stays down this long.
            await asyncio.sleep(outage_s)
            done_during = await run.succeeded()
            proxy.restore()
            down_s = loop.time() - cut_at
            await run.settle(settle_timeout_s(jobs), alive=worker)
            alive = worker.running
            code, _ = await asyncio.to_thread(worker.terminate, 60)
        finally:
            run.stop_workers()
    finally:
        proxy.stop()
    nacked = sum(1 for line in worker.log_lines() if line.get("message") == "job_nacked")
    return await run.report(
        succeeded_at_cut=done_at_cut,
        succeeded_during_outage=done_during - done_at_cut,
        storage_down_s=round(down_s, 1),
        nacks=nacked,
        worker_survived=alive,
        last_exit_code=code,
    )


#: The bad-input scenario's worker runs under this address-space limit (``RLIMIT_AS``), a container's memory limit.
BAD_INPUT_MEMORY_LIMIT_BYTES = 1 << 30
#: Its limits, sized to fit: the largest image at its worst bytes per pixel (lossless WebP with alpha, 22),
#: beside a pixel budget of a third of the memory at 4.5 bytes a pixel, beside the interpreter.
BAD_INPUT_LIMITS: dict[str, Any] = {
    "max_input_pixels": 12_000_000,
    "max_pixels_in_flight": 60_000_000,
}
#: CPUs its worker may use, as a pod's CPU limit: the worker runs one image thread per CPU.
BAD_INPUT_CPUS = 2
#: Finished good jobs whose ids the takeover kinds then reuse.
TAKEN_IDS = 3


async def bad_messages(
    stack: Stack,
    workdir: Path,
    *,
    jobs: int = 900,
    bad_share: float = 0.1,
    seed: int = 4,
    memory_limit_bytes: int | None = BAD_INPUT_MEMORY_LIMIT_BYTES,
) -> Report:
    """Scenario 4: ``bad_share`` of all messages are bad, of every kind; good work goes on, the worker never exits.

    A few good jobs finish first, so that the takeover kinds have ids to reuse. ``/healthz`` is asked
    every 0.1 s throughout, from a thread of the harness's own: its latencies are the report's.
    """
    run = Run(
        stack, "bad_messages", workdir, memory_limit_bytes=memory_limit_bytes, cpus=BAD_INPUT_CPUS, **BAD_INPUT_LIMITS
    )
    await run.setup()
    bad_count = max(len(BAD_KINDS), round(jobs * bad_share / (1 - bad_share)))
    worker = run.worker()
    probe = HealthProbe(f"http://127.0.0.1:{worker.port}/healthz")
    try:
        worker.start()
        await asyncio.to_thread(worker.wait_ready)
        probe.start()
        async with run.client() as client:
            uris = await run.inputs(client)
            taken = run.good_jobs(TAKEN_IDS, uris)
            await run.publish(client, taken, [], seed=seed)
            await run.wait_progress(TAKEN_IDS, settle_timeout_s(TAKEN_IDS), alive=worker)
            good = run.good_jobs(jobs - TAKEN_IDS, uris)
            bad = await run.bad_messages(client, bad_count, uris, taken)
            await run.publish(client, good, bad, seed=seed)
        await run.settle(settle_timeout_s(jobs + bad_count), alive=worker)
        series = await asyncio.to_thread(version_series, worker.port)
        alive = worker.running
        probe.stop()
        code, _ = await asyncio.to_thread(worker.terminate, 60)
    finally:
        probe.stop()
        run.stop_workers()
    return await run.report(
        worker_survived=alive,
        last_exit_code=code,
        memory_limit_mb=memory_limit_bytes // 2**20 if memory_limit_bytes else None,
        version_label_values=series,
        **probe.summary(),
    )


def version_series(port: int) -> int:
    """Distinct ``version`` label values of the worker's ``tritonq_jobs`` counter: the catalog's, or unknown."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {
        part.split('version="', 1)[1].split('"', 1)[0]
        for part in text.splitlines()
        if part.startswith("tritonq_jobs_total{") and 'version="' in part
    }
    return len(values)


async def sigterm(
    stack: Stack,
    workdir: Path,
    *,
    jobs: int = 300,
    grace_s: float = 2.0,
    image_size: tuple[int, int] = (512, 512),
    seed: int = 5,
) -> Report:
    """Scenario 5: SIGTERM mid-run exits 0 within the grace period; what it did not finish, a second worker does.

    Larger images than the other scenarios, so that jobs are still queued in
    Triton when the grace period ends and the cancel-and-nack path runs too.
    """
    # Without a dead-letter policy, as in worker_killed: with one, the emulator drops the
    # nacks sent after the stream closed (shutdown) and never redelivers those messages.
    run = Run(stack, "sigterm", workdir, dead_letter=False, image_size=image_size, shutdown_grace_s=grace_s)
    await run.publish_good(jobs, seed)
    first = run.worker("first")
    second = run.worker("second")
    try:
        first.start()
        await asyncio.to_thread(first.wait_ready)
        await run.wait_progress(max(1, jobs // 10), settle_timeout_s(jobs), alive=first)
        code, exit_s = await asyncio.to_thread(first.terminate, grace_s + EXIT_SLACK_S)
        done_by_first = await run.succeeded()
        second.start()
        await asyncio.to_thread(second.wait_ready)
        # No orphan allowance: a stopping worker ends its stream cleanly, and the emulator drops it.
        await run.settle(settle_timeout_s(jobs), alive=second)
        second_code, _ = await asyncio.to_thread(second.terminate, 60)
    finally:
        run.stop_workers()
    lines = first.log_lines()
    stopped = [line for line in lines if line.get("message") == "worker_stopped"]
    return await run.report(
        grace_period_over=any(line.get("message") == "grace_period_over" for line in lines),
        exit_code=code,
        exit_s=round(exit_s, 2),
        grace_s=grace_s,
        done_by_first=done_by_first,
        nacked_at_stop=stopped[-1].get("nacked") if stopped else None,
        second_exit_code=second_code,
    )


async def backlog_memory(
    stack: Stack, workdir: Path, *, backlog: int = 5000, drain: int | None = None, seed: int = 6
) -> Report:
    """Bounded memory: ``backlog`` inline-payload jobs wait before the worker starts; peak RSS is reported.

    ``drain`` stops the worker (SIGTERM) after that many succeeded, for a short
    test; the rest stays in the subscription, so ``lost`` is then not meaningful.
    """
    run = Run(stack, "backlog_memory", workdir)
    await run.setup()
    async with run.client() as client:
        good = run.good_jobs(backlog, [], inline=True)
        await run.publish(client, good, [], seed=seed)
    worker = run.worker()
    try:
        worker.start()
        await asyncio.to_thread(worker.wait_ready)
        if drain is None:
            await run.settle(settle_timeout_s(backlog), alive=worker)
        else:
            await run.wait_progress(drain, settle_timeout_s(drain), alive=worker)
        code, _ = await asyncio.to_thread(worker.terminate, 60)
    finally:
        run.stop_workers()
    report = await run.report(backlog=backlog, drained=drain or backlog, exit_code=code)
    if drain is not None:
        report.lost = 0  # the undrained rest is still in the subscription, not lost
        report.notes.pop("lost_jobs", None)
    return report
