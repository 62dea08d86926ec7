"""``python -m bench.storage_clients``: the measurement behind ``worker/storage.py``'s choice of GCS client.

The job's storage pattern (one ~20 KB input read, a result write and a record
write, both create-only) at 32 jobs in flight against the same fake-gcs-server,
with gcloud-aio-storage on the event loop and with google-cloud-storage in a
thread pool of 32. Reports jobs per second and this process's CPU per job.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import procstat
from devstack.components import GcsEmulator
from devstack.samples import sample_image
from worker.jobs import GcsRef
from worker.provision import create_bucket
from worker.storage import Storage

JOBS = 600
CONCURRENCY = 32
BUCKET = "clients-bench"


async def _timed(name: str, job: Callable[[int], Awaitable[None]]) -> dict[str, float]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with gate:
            await job(i)

    cpu, wall = procstat.own_cpu_seconds(), time.monotonic()
    await asyncio.gather(*(one(i) for i in range(JOBS)))
    cpu, wall = procstat.own_cpu_seconds() - cpu, time.monotonic() - wall
    figures = {"jobs_per_s": round(JOBS / wall, 1), "cpu_ms_per_job": round(cpu * 1000 / JOBS, 2)}
    print(f"{name}: {figures}")
    return figures


async def measure(gcs_url: str) -> dict[str, dict[str, float]]:
    data = sample_image(256, 256)
    result, record = b"r" * 20_000, b'{"status": "SUCCEEDED"}'
    storage = Storage()
    await storage.start()
    await storage.upload(GcsRef(BUCKET, "input.jpg"), data, "image/jpeg")

    async def aio_job(i: int) -> None:
        await storage.read_input(GcsRef(BUCKET, "input.jpg"), 1 << 20)
        await storage.write_once(GcsRef(BUCKET, f"aio/{i}.jpg"), result, "image/jpeg", {"model": "m"})
        await storage.write_once(GcsRef(BUCKET, f"aio/{i}.json"), record, "application/json", {"model": "m"})

    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
    client = gcs.Client(project="bench", credentials=credentials, client_options={"api_endpoint": gcs_url})
    bucket = client.bucket(BUCKET)
    pool = ThreadPoolExecutor(CONCURRENCY)

    def threaded(i: int) -> None:
        bucket.blob("input.jpg").download_as_bytes()
        for name, body in ((f"sync/{i}.jpg", result), (f"sync/{i}.json", record)):
            blob = bucket.blob(name)
            blob.metadata = {"model": "m"}
            blob.upload_from_string(body, if_generation_match=0)

    async def sync_job(i: int) -> None:
        await asyncio.get_running_loop().run_in_executor(pool, threaded, i)

    try:
        # Each client writes to its own prefix; the thread-pool client goes first, so it meets the
        # emptier bucket (fake-gcs-server slows down as a bucket fills).
        threaded_figures = await _timed("google-cloud-storage in threads", sync_job)
        return {
            "google-cloud-storage in threads": threaded_figures,
            "gcloud-aio-storage": await _timed("gcloud-aio-storage", aio_job),
        }
    finally:
        await storage.close()
        pool.shutdown()


def main() -> int:
    emulator = GcsEmulator("gcs", Path("build/storage-clients/logs").resolve())
    emulator.start()
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        create_bucket(emulator.url, "bench", BUCKET)
        asyncio.run(measure(emulator.url))
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
