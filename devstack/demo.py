"""``make demo`` (``tritonq demo``): the main job, end to end, on the embedded local stack.

Starts the real Pub/Sub emulator, GCS emulator and Triton, runs ``tritonq run``
as a separate process (as it runs in a pod), publishes generated sample images
of several sizes to the image models Triton serves, waits for every result
with a progress bar, prints a table, and stops everything it started.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tqdm import tqdm

from devstack.probe import free_port
from devstack.samples import sample_image
from devstack.stack import Stack
from devstack.worker_process import WorkerProcess
from worker.client import JobClient, build_job
from worker.config import Settings
from worker.jobs import ImageJob, JobResult
from worker.triton import TritonControl

#: Sizes of the generated samples: small, odd and larger than a phone thumbnail.
SAMPLE_SIZES = ((256, 256), (320, 240), (640, 480), (512, 768))
#: Models the demo sends jobs to, when Triton serves them, with their job params.
DEMO_MODELS: tuple[tuple[str, dict[str, str]], ...] = (
    ("enhance", {}),
    ("upscale", {"scale": "2"}),
    ("background_remove", {}),
    ("style_comic", {}),
    ("style_aged", {}),
    ("embedding", {}),
    ("resnet50", {}),
    ("pcb_detector", {}),
)
#: The demo shows an A/B split: enhance v1 in production, v2 as a 10% candidate.
DEMO_ROUTES = "enhance=1:90,2:10"


def run_demo(count: int, state_dir: Path) -> int:
    state_dir = state_dir.resolve()
    stack = Stack(state_dir=state_dir)
    try:
        stack.start(progress=lambda text: print(f"demo: {text}", flush=True))
        settings = Settings(
            http_port=free_port(),
            log_format="json",
            triton_url=stack.triton.grpc_url,
            routes=DEMO_ROUTES,
        )
        stack.provision(settings)
        env = {**stack.environment(settings), "TRITONQ_LOG_FORMAT": "json", "TRITONQ_ROUTES": DEMO_ROUTES}
        with WorkerProcess(env, state_dir / "logs" / "worker.log", http_port=settings.http_port) as worker:
            worker.wait_ready()
            print("demo: worker ready", flush=True)
            with stack.environ(settings):
                rows = asyncio.run(_publish_and_wait(settings, count))
    finally:
        stack.stop()
    _print_table(rows)
    succeeded = sum(1 for row in rows if row[-1] == "succeeded")
    print(f"demo: {succeeded}/{len(rows)} jobs succeeded")
    return 0 if succeeded == len(rows) else 1


async def _publish_and_wait(settings: Settings, count: int) -> list[tuple[str, ...]]:
    control = TritonControl(settings.triton_url)
    index = await control.repository_index()
    await control.close()
    served = {entry["name"] for entry in index if entry.get("state") == "READY"}
    models = [(name, params) for name, params in DEMO_MODELS if name in served]
    if not models:
        raise RuntimeError("triton serves none of the demo models")

    async with JobClient(settings) as client:
        jobs: list[tuple[ImageJob, float]] = []
        for i in range(count):
            width, height = SAMPLE_SIZES[i % len(SAMPLE_SIZES)]
            model, params = models[i % len(models)]
            data = sample_image(width, height, seed=i)
            job_id = f"demo-{i:03d}-{model}"
            uri = await client.upload_bytes(data, f"{job_id}.jpg")
            job = build_job(model, input_uri=uri, job_id=job_id, params=params)
            await client.publish(job)
            jobs.append((job, time.monotonic()))

        rows: list[tuple[str, ...]] = []
        with tqdm(total=len(jobs), desc="demo jobs", unit="job") as bar:

            async def wait_one(job: ImageJob, started: float) -> tuple[str, ...]:
                result = await client.wait(job, timeout_s=300)
                bar.update(1)
                status = "succeeded" if result.status == JobResult.SUCCEEDED else f"failed: {result.error_code}"
                latency = f"{result.latency_ms:.0f} ms" if result.latency_ms else f"{time.monotonic() - started:.1f} s"
                return (job.job_id, job.model, result.model_version, result.output_uri, latency, status)

            rows = list(await asyncio.gather(*(wait_one(job, started) for job, started in jobs)))
    return rows


def _print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("job", "model", "version", "output", "latency", "status")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
