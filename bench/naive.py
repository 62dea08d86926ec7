"""The naive worker the product is measured against: one message at a time, every step blocking.

What a first version of the bridge does (seed ``001``): pull one message,
download its input, preprocess, send one unary ``tritonclient.grpc`` inference,
encode, upload the result and its record, ack, and only then pull the next.
It uses the same job contract and the same image code as the product
(``worker.jobs``, ``ModelSpec``), plain HTTP to the GCS JSON API, and the
synchronous Pub/Sub client; the GPU idles while the CPU works and the other way
round, and every batch holds one image. It lives in the benchmark, not in the
product.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import tritonclient.grpc as triton_grpc
from google.cloud import pubsub_v1

from worker import jobs
from worker.config import Settings
from worker.images import DecodeLimits
from worker.models import ModelSpec

#: Seconds one synchronous pull waits for a message before trying again.
PULL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class NaiveRun:
    jobs: int
    wall_s: float

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.wall_s


class NaiveWorker:
    """Processes ``count`` messages of ``settings.subscription``, one after the other."""

    def __init__(self, settings: Settings, spec: ModelSpec, gcs_url: str) -> None:
        self._settings = settings
        self._spec = spec
        self._gcs_url = gcs_url.rstrip("/")
        self._limits = DecodeLimits(max_bytes=settings.max_input_bytes, max_pixels=settings.max_input_pixels)

    def run(self, count: int, progress: Callable[[int], None] = lambda _: None) -> NaiveRun:
        """Process ``count`` jobs; the wall time runs from the first pull to the last ack."""
        subscriber = pubsub_v1.SubscriberClient()
        triton = triton_grpc.InferenceServerClient(self._settings.triton_url)
        started: float | None = None
        try:
            done = 0
            while done < count:
                response = subscriber.pull(
                    request={"subscription": self._settings.subscription_path, "max_messages": 1},
                    timeout=PULL_TIMEOUT_S,
                )
                if started is None:
                    started = time.monotonic()
                for received in response.received_messages:
                    self._process(received.message, triton)
                    subscriber.acknowledge(
                        request={"subscription": self._settings.subscription_path, "ack_ids": [received.ack_id]}
                    )
                    done += 1
                    progress(1)
            assert started is not None
            return NaiveRun(count, time.monotonic() - started)
        finally:
            triton.close()
            subscriber.close()

    def _process(self, message: pubsub_v1.types.PubsubMessage, triton: triton_grpc.InferenceServerClient) -> None:
        job = jobs.decode_message(message.data, dict(message.attributes))
        source = jobs.parse_gs_uri(job.input_uri)
        data = self._download(source.bucket, source.name)
        prepared = self._spec.preprocess(data, self._limits, dict(job.params))
        tensor = triton_grpc.InferInput(self._spec.input.name, [1, *prepared.array.shape], self._spec.input.wire_dtype)
        tensor.set_data_from_numpy(prepared.array[np.newaxis])
        response = triton.infer(self._spec.name, [tensor])
        output_array = response.as_numpy(self._spec.output.name)[0]
        output = self._spec.postprocess(output_array, prepared, job.output_format)
        target = jobs.parse_gs_uri(job.output_prefix) if job.output_prefix else None
        bucket = target.bucket if target else self._settings.output_bucket
        prefix = target.name.strip("/") if target else jobs.RESULTS_PREFIX
        self._upload(bucket, f"{prefix}/{job.job_id}.{output.extension}", output.data, output.content_type)
        publish_time = message.publish_time.timestamp()
        record = jobs.JobResult(
            job_id=job.job_id,
            status=jobs.JobResult.SUCCEEDED,
            model=job.model,
            model_version=response.get_response().model_version,
            output_uri=f"gs://{bucket}/{prefix}/{job.job_id}.{output.extension}",
            finished_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            message_id=message.message_id,
            latency_ms=round((time.time() - publish_time) * 1000, 3),
        )
        self._upload(bucket, f"{prefix}/{job.job_id}.json", jobs.result_json(record), "application/json")

    def _download(self, bucket: str, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self._gcs_url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=30) as r:
            data: bytes = r.read()
            return data

    def _upload(self, bucket: str, name: str, data: bytes, content_type: str) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        request = urllib.request.Request(
            f"{self._gcs_url}/upload/storage/v1/b/{bucket}/o?{query}",
            data=data,
            headers={"Content-Type": content_type},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            json.loads(response.read())
