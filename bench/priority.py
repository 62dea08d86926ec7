"""``python -m bench.priority``: does a burst of high-priority jobs overtake a low-priority backlog?

The priority figure: a backlog of 1,000 low-priority jobs, then 20 high-priority
jobs published once the worker is busy with it; the p95 publish-to-result
latency of each class, and their ratio (target: high at least 3x lower).
Same stack and simulated GPU as ``python -m bench``; run twice, with the
worker holding 64 messages (the default flow control: the highs wait in
Pub/Sub behind the backlog, which Pub/Sub does not reorder) and holding the
whole backlog (``TRITONQ_MAX_MESSAGES`` above it: the worker's own queue and
Triton's queue then serve the highs first). Writes ``build/priority.json``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import sim_model, stats, workload
from bench.progress import Progress
from bench.runs import Lab, started_lab
from worker.client import JobClient, build_job

LOW_JOBS = 1000
HIGH_JOBS = 20
IMAGE_PX = 64
#: Jobs of the backlog done before the high-priority burst is published: the worker is busy.
BUSY_AFTER = 100
HOLDS = {"default_flow_control": 64, "backlog_held": LOW_JOBS + HIGH_JOBS + 100}


async def one_run(lab: Lab, name: str, max_messages: int) -> dict[str, Any]:
    settings = lab.settings(f"prio-{name}")
    async with JobClient(settings) as client:
        inputs = await lab.inputs(client, IMAGE_PX)
        buckets = settings.allowed_output_buckets

        def jobs(kind: str, count: int, priority: str) -> list[Any]:
            return [
                build_job(
                    sim_model.MODEL_NAME,
                    input_uri=inputs.uris[i % len(inputs.uris)],
                    job_id=f"prio-{name}-{kind}-{i:05d}",
                    output_prefix=f"gs://{buckets[i % len(buckets)]}/results",
                    priority=priority,
                )
                for i in range(count)
            ]

        lows, highs = jobs("low", LOW_JOBS, "low"), jobs("high", HIGH_JOBS, "high")
        await workload.publish_backlog(client, lows, lambda _: None)
        env = {"TRITONQ_MAX_MESSAGES": str(max_messages)}
        with lab.worker(settings, f"prio-{name}", env) as worker:
            await asyncio.to_thread(worker.wait_ready)
            await client.wait_many(lows[:BUSY_AFTER], timeout_s=120)  # the worker is busy with the backlog
            published = time.monotonic()
            await asyncio.gather(*(client.publish(job) for job in highs))
            high_results = await client.wait_many(highs, timeout_s=600)
            high_done_s = time.monotonic() - published
            low_results = await client.wait_many(lows, timeout_s=600)
    high_ms = [r.latency_ms for r in high_results]
    low_ms = [r.latency_ms for r in low_results]
    high_p95 = stats.percentile(high_ms, 95)
    low_p95 = stats.percentile(low_ms, 95)
    return {
        "max_messages": max_messages,
        "high_latency_ms": stats.summarize(high_ms),
        "low_latency_ms": stats.summarize(low_ms),
        "high_burst_done_s": round(high_done_s, 2),
        "low_over_high_p95": round(low_p95 / high_p95, 2) if high_p95 else None,
    }


async def measure(lab: Lab) -> dict[str, Any]:
    return {name: await one_run(lab, name, hold) for name, hold in HOLDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    state_dir = Path("build/priority-state").resolve()
    progress = Progress(2)
    repository = sim_model.prepare_repository(state_dir / "model_repository", sim_model.SimProfile(), priorities=True)
    progress.phase("starting the stack")
    with started_lab(state_dir, repository, progress) as lab:
        progress.phase("measuring")
        figures = asyncio.run(measure(lab))
    document = {"low_jobs": LOW_JOBS, "high_jobs": HIGH_JOBS, "image_px": IMAGE_PX, "runs": figures}
    out = Path("build/priority.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    for name, run in figures.items():
        high, low = run["high_latency_ms"] or {}, run["low_latency_ms"] or {}
        print(
            f"{name} (max_messages={run['max_messages']}): high p95 {high.get('p95', 0):.0f} ms, "
            f"low p95 {low.get('p95', 0):.0f} ms, low/high {run['low_over_high_p95']}x"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
