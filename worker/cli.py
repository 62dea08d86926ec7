"""The ``tritonq`` command: ``run``, ``publish``, ``init``, ``schema``, ``settings``; in a checkout ``stack``, ``demo``.

This is the face of the worker and the product's only place that handles signals:
SIGTERM and SIGINT become ``Worker.request_stop()``. It also owns the worker
process's interpreter settings (``tune_gc``). ``stack`` and ``demo`` belong to
the development package ``devstack``, imported only when one of them runs: the
worker image ships without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from google.protobuf import json_format

from worker import telemetry
from worker.config import Settings, settings_markdown
from worker.jobs import ImageJob, JobResult

STATE_DIR = Path(".tritonq")
#: Allocations between collections of the youngest generation (CPython's default: 700).
GC_YOUNG_THRESHOLD = 20_000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("run", help="run the worker (configured from TRITONQ_* variables)")

    publish = commands.add_parser("publish", help="publish a job for a local image, a gs:// URI or inline bytes")
    publish.add_argument("source", help="an image file, a directory of images, a quoted glob, or gs://bucket/object")
    publish.add_argument("--model", required=True)
    publish.add_argument("--version", default="")
    publish.add_argument("--param", action="append", default=[], metavar="K=V")
    publish.add_argument("--format", default="", help="png, jpeg, webp, json, npy (default: the model's)")
    publish.add_argument("--inline", action="store_true", help="carry a local image in the message itself")
    publish.add_argument("--job-id", default="")
    publish.add_argument("--wait", action="store_true", help="wait for the result record and print it")
    publish.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits")
    publish.add_argument("--priority", default="", choices=["", "high", "normal", "low"])
    publish.add_argument("--timeout-s", type=float, default=0.0, help="the job's own deadline, from publish time")

    stack = commands.add_parser("stack", help="run the real local stack (Pub/Sub, GCS, Triton) until interrupted")
    stack.add_argument("--state-dir", type=Path, default=STATE_DIR)

    demo = commands.add_parser("demo", help="start the stack and a worker, run sample jobs, print a table")
    demo.add_argument("--jobs", type=int, default=16)
    demo.add_argument("--state-dir", type=Path, default=STATE_DIR / "demo")

    commands.add_parser("init", help="create the topic, subscription, dead-letter topic (idempotent)")
    schema = commands.add_parser("schema", help="the jobs topic's Pub/Sub schema (ImageJob, JSON encoding)")
    schema.add_argument("action", choices=["show", "apply", "gcloud"], help="print it, apply it, or print gcloud lines")
    settings_cmd = commands.add_parser("settings", help="print the settings in effect")
    settings_cmd.add_argument("--markdown", action="store_true", help="print the README's settings table")

    args = parser.parse_args(argv)
    if args.command == "settings" and args.markdown:
        sys.stdout.write(settings_markdown())
        return 0
    from pydantic import ValidationError

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"tritonq: invalid TRITONQ_* settings:\n{exc}", file=sys.stderr)
        return 2
    telemetry.configure_logging(settings.log_level, settings.log_format)
    if args.command == "run":
        return _run_worker(settings)
    if args.command == "publish":
        return asyncio.run(_publish(settings, args))
    if args.command == "stack":
        code: int = _development("devstack.stack").serve(settings, args.state_dir)
        return code
    if args.command == "demo":
        code = _development("devstack.demo").run_demo(args.jobs, args.state_dir)
        return code
    if args.command == "init":
        from worker.provision import create_bucket, provision_pubsub

        provision_pubsub(settings)
        print(f"created {settings.topic_path}, {settings.subscription_path} and its dead-letter topic")
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            # Only an emulator starts empty; real buckets are created once, with their IAM (README).
            for bucket in sorted({settings.input_bucket, settings.output_bucket}):
                create_bucket(emulator, settings.project, bucket)
            print(f"created buckets {settings.input_bucket} and {settings.output_bucket} on {emulator}")
        return 0
    if args.command == "schema":
        from worker import schema as topic_schema

        if args.action == "show":
            sys.stdout.write(topic_schema.definition())
        elif args.action == "gcloud":
            print("\n".join(topic_schema.gcloud_commands(settings.project, settings.topic)))
        else:
            print(f"applied {topic_schema.apply(settings.project, settings.topic)} to {settings.topic_path}")
        return 0
    print(json.dumps(settings.model_dump(), indent=2, default=list))
    return 0


def tune_gc() -> None:
    """Freeze what start-up built and collect the young generation less often.

    A job allocates thousands of short-lived objects (protobuf messages, HTTP requests, futures). With
    CPython's defaults the collector ran 155 times while the worker drained the benchmark's 2,000 jobs,
    0.23 s in all (``gc.callbacks``), about 3% of its CPU, 80 ms of it one full collection walking the
    ~100,000 objects the imports made. Frozen, those are never walked again; with a young generation of
    20,000 the same run collected once (0.01 s). Reference counting still frees a job's arrays as soon
    as it ends (``test_a_job_frees_its_arrays_without_the_garbage_collector``); only cyclic garbage
    waits longer.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _run_worker(settings: Settings) -> int:
    from worker.service import Worker

    tune_gc()  # after the import above, which loads nearly every module the worker runs

    async def serve() -> int:
        worker = Worker(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
        await worker.run()
        # Non-zero when the worker could not go on (its subscription kept failing): Kubernetes restarts it.
        return 0 if worker.failure is None else 1

    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(serve())
    return asyncio.run(serve())


def _parse_params(pairs: Sequence[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--param {pair!r}: expected K=V")
        params[key] = value
    return params


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


def expand_sources(source: str) -> list[str]:
    """A gs:// URI, a file, every image in a directory, or every match of a glob."""
    if source.startswith("gs://"):
        return [source]
    path = Path(source)
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if any(char in source for char in "*?["):
        return sorted(str(p) for p in Path().glob(source) if p.is_file())
    return [source]


async def _publish(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from worker.client import JobClient, build_job, new_job_id

    sources = expand_sources(args.source)
    if not sources:
        print(f"no images match {args.source}", file=sys.stderr)
        return 2
    options = {
        "version": args.version,
        "params": _parse_params(args.param),
        "output_format": args.format,
        "priority": args.priority,
        "timeout_s": args.timeout_s,
    }
    many = len(sources) > 1
    async with JobClient(settings) as client:

        async def one(source: str) -> ImageJob:
            job_id = args.job_id if args.job_id and not many else new_job_id()
            if source.startswith("gs://"):
                return build_job(args.model, input_uri=source, job_id=job_id, **options)
            if args.inline:
                data = await asyncio.to_thread(Path(source).read_bytes)
                return build_job(args.model, input_bytes=data, job_id=job_id, **options)
            return await client.job_for_file(Path(source), args.model, job_id=job_id, **options)

        with tqdm(total=len(sources), desc="publish", unit="job", disable=not many) as bar:

            async def publish(source: str) -> ImageJob:
                job = await one(source)
                message_id = await client.publish(job)
                bar.update(1)
                if not many:
                    print(f"published job {job.job_id} as message {message_id}")
                return job

            jobs = list(await asyncio.gather(*(publish(source) for source in sources)))
        for job in jobs if not many else jobs[:1]:
            output = client.output_of(job)
            print(
                f"result record: gs://{output.bucket}/{output.name}/{job.job_id}.json"
                + (" (and the rest beside it)" if many else "")
            )
        if not args.wait:
            return 0
        started = time.monotonic()
        with tqdm(total=len(jobs), desc="results", unit="job", disable=not many) as bar:
            results = await client.wait_many(jobs, timeout_s=args.timeout, on_result=lambda _: bar.update(1))
        if not many:
            print(json_format.MessageToJson(results[0], preserving_proto_field_name=True))
        print(summary(results, time.monotonic() - started))
        return 0 if all(r.status == JobResult.SUCCEEDED for r in results) else 1


def summary(results: Sequence[JobResult], waited_s: float) -> str:
    """One line: how many succeeded and failed, and the publish-to-result latency percentiles."""
    succeeded = sum(1 for r in results if r.status == JobResult.SUCCEEDED)
    latencies = sorted(r.latency_ms for r in results)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return (
        f"{succeeded} succeeded, {len(results) - succeeded} failed in {waited_s:.2f} s; "
        f"latency p50 {pct(0.50):.0f} ms, p95 {pct(0.95):.0f} ms"
    )


def _development(module: str) -> ModuleType:
    """A module of the development package, or a clear exit where it is not installed (the worker image)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name not in ("devstack", module):
            raise
        raise SystemExit(
            f"tritonq: {module} is not installed: `tritonq stack` and `tritonq demo` run from a checkout of the "
            "repository (`make install`); the worker image has the production commands only "
            "(run, publish, init, schema, settings)"
        ) from None


if __name__ == "__main__":
    raise SystemExit(main())
