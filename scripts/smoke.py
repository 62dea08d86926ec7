#!/usr/bin/env python3
"""Smoke test of a deployed tritonq: is the environment the settings point at actually serving?

Run against whatever the ``TRITONQ_*`` settings (and ``PUBSUB_EMULATOR_HOST`` /
``STORAGE_EMULATOR_HOST`` for emulators) point at:

    make smoke                                   # the settings in your environment
    docker compose run --rm smoke                # inside the compose stack
    kubectl -n tritonq port-forward deploy/tritonq 8001:8001 &   # GKE: Triton on localhost:8001,
    TRITONQ_PROJECT=... make smoke               # Pub/Sub and GCS with your own credentials

Steps, each printed as it passes:

1. Triton (``TRITONQ_TRITON_URL``, gRPC) is live and ready.
2. Every model of Triton's repository index is READY, and there is at least one.
3. A generated image is published with ``tritonq publish --wait`` (the real command, so its
   upload, message and wait are exercised too) and its result record says SUCCEEDED.
4. The result object exists, is not empty, and decodes as what it claims (an image of the
   recorded shape, JSON, or a .npy array).

Exit status: 0 all passed; 1 a check failed (the message says which); 2 the settings are invalid.
It needs only the project's own dependencies, so it runs from the dev venv and in the worker image.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class SmokeFailure(Exception):
    """A check did not pass; the message says what was expected and what was found."""


def say(text: str) -> None:
    print(f"smoke: {text}", flush=True)


def check_triton(url: str, ready_timeout_s: float) -> list[str]:
    """Triton ready and every model in its repository index READY; returns the model names."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url=url)
    deadline = time.monotonic() + ready_timeout_s
    last_error = "not ready"
    while True:
        try:
            if client.is_server_live() and client.is_server_ready():
                break
        except InferenceServerException as exc:
            last_error = str(exc)
        if time.monotonic() > deadline:
            raise SmokeFailure(f"Triton at {url} not ready after {ready_timeout_s:.0f} s: {last_error}")
        time.sleep(2)
    say(f"ok   Triton at {url} is live and ready")

    index: dict[str, Any] = client.get_model_repository_index(as_json=True)
    entries = index.get("models", [])
    if not entries:
        raise SmokeFailure(f"Triton at {url} has no models in its repository index")
    not_ready = [
        f"{e.get('name')} v{e.get('version') or '?'}: {e.get('state') or 'UNAVAILABLE'} {e.get('reason', '')}".strip()
        for e in entries
        if e.get("state") != "READY"
    ]
    if not_ready:
        raise SmokeFailure("models not ready: " + "; ".join(not_ready))
    names = sorted({e["name"] for e in entries})
    for name in names:
        if not client.is_model_ready(name):
            raise SmokeFailure(f"model {name} is in the index as READY but is_model_ready says no")
    say(f"ok   {len(names)} models ready: {', '.join(names)}")
    return names


def sample_image(directory: Path) -> Path:
    """A small deterministic RGB gradient PNG: valid for every image model, cheap on CPU."""
    import numpy as np
    from PIL import Image

    height, width = 48, 64
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    path = directory / "smoke.png"
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path)
    return path


def publish_and_wait(image: Path, model: str, job_timeout_s: float) -> dict[str, Any]:
    """``tritonq publish --wait`` as a user runs it; returns the result record it prints."""
    job_id = f"smoke-{uuid.uuid4().hex[:12]}"
    command = [
        sys.executable, "-m", "worker.cli", "publish", str(image),
        "--model", model, "--job-id", job_id, "--wait", "--timeout", str(job_timeout_s),
    ]  # fmt: skip
    say(f"...  tritonq publish {image.name} --model {model} --job-id {job_id} --wait")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=job_timeout_s + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SmokeFailure(f"tritonq publish did not return within {job_timeout_s + 60:.0f} s") from exc
    record = _printed_record(done.stdout)
    if record is None:
        raise SmokeFailure(
            f"tritonq publish exited {done.returncode} without a result record\n"
            f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
        )
    if not record:
        raise SmokeFailure(f"job {job_id}: the result record is empty\n--- stdout\n{done.stdout}")
    if record.get("job_id") != job_id:
        raise SmokeFailure(f"result record is for job {record.get('job_id')!r}, expected {job_id!r}")
    if record.get("status") != "SUCCEEDED" or done.returncode != 0:
        raise SmokeFailure(
            f"job {job_id} {record.get('status')} (exit {done.returncode}): "
            f"{record.get('error_code', '')} {record.get('error_message', '')}".strip()
        )
    timings = ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(record.get("timings_ms", {}).items()))
    say(f"ok   job {job_id} SUCCEEDED on {model} v{record.get('model_version', '?')} ({timings})")
    return record


def _printed_record(stdout: str) -> dict[str, Any] | None:
    """The JSON object ``tritonq publish --wait`` prints (indented, between other lines)."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("{")]
    if not starts:
        return None
    start = starts[0]
    if lines[start].rstrip() == "{}":
        return {}
    try:
        end = lines.index("}", start)
        parsed: dict[str, Any] = json.loads("\n".join(lines[start : end + 1]))
    except ValueError:  # no closing line, or not JSON (json.JSONDecodeError is a ValueError)
        return None
    return parsed


async def _read_object(uri: str) -> bytes:
    from worker.client import JobClient
    from worker.config import Settings

    async with JobClient(Settings()) as client:
        return await client.read(uri)


def check_result_object(record: dict[str, Any]) -> None:
    """The output object exists and holds what the record says."""
    uri = record.get("output_uri", "")
    if not uri.startswith("gs://"):
        raise SmokeFailure(f"result record has no output_uri: {record}")
    data = asyncio.run(_read_object(uri))
    if not data:
        raise SmokeFailure(f"{uri} is empty")
    shape = [int(n) for n in record.get("output_shape", [])]
    suffix = Path(uri).suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg", ".webp"):
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            image.load()
            found = f"{image.format} {image.width}x{image.height}"
            if len(shape) >= 2 and (image.height, image.width) != (shape[0], shape[1]):
                raise SmokeFailure(f"{uri}: {found}, but the record says shape {shape}")
    elif suffix == ".json":
        json.loads(data)
        found = "JSON"
    elif suffix == ".npy":
        import numpy as np

        array = np.load(io.BytesIO(data), allow_pickle=False)
        found = f"array {list(array.shape)}"
        if shape and list(array.shape) != shape:
            raise SmokeFailure(f"{uri}: {found}, but the record says shape {shape}")
    else:
        found = "unrecognised type, size checked only"
    say(f"ok   {uri}: {len(data)} bytes, {found}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="enhance", help="model the sample job names (default: enhance)")
    parser.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for Triton ready")
    parser.add_argument("--job-timeout", type=float, default=180.0, help="seconds to wait for the result")
    args = parser.parse_args(argv)

    from pydantic import ValidationError

    from worker.config import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"smoke: FAIL invalid TRITONQ_* settings:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    say(f"...  project {settings.project}, topic {settings.topic}, Triton {settings.triton_url}")
    started = time.monotonic()
    try:
        models = check_triton(settings.triton_url, args.ready_timeout)
        if args.model not in models:
            raise SmokeFailure(f"model {args.model!r} is not served; Triton has {', '.join(models)}")
        with tempfile.TemporaryDirectory(prefix="tritonq-smoke-") as tmp:
            record = publish_and_wait(sample_image(Path(tmp)), args.model, args.job_timeout)
        check_result_object(record)
    except SmokeFailure as exc:
        print(f"smoke: FAIL {exc}", file=sys.stderr)
        return EXIT_FAILED
    say(f"PASS in {time.monotonic() - started:.1f} s")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
