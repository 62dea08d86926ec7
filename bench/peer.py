"""The idiomatic peer: the worker a competent user writes in an afternoon with Google's and NVIDIA's clients.

The product worker is measured against it (``bench/peer_run.py`` drives it).
It is the textbook shape of such a bridge, built as well as the libraries allow:

- google-cloud-pubsub's ``SubscriberClient.subscribe`` with flow control and a
  callback pool as large as the product's in-flight limit, so as many jobs run at
  once; the library leases, extends and batches acks;
- one shared ``tritonclient.grpc`` client (one HTTP/2 channel) doing blocking
  ``infer`` from the callback threads, so Triton's dynamic batcher sees up to
  ``HELD`` requests at once and batches them;
- one shared google-cloud-storage client, its connection pool as large as the
  callback pool (the default pool of 10 would drop connections under 64
  threads), for the input read and the two create-only writes
  (``if_generation_match=0``, which the library retries as idempotent);
- Pillow for decode and encode (JPEG quality 90, 4:2:0, as the product).

It writes what the product writes, where the product writes it: the result at
``{prefix}/{job_id}.jpg`` and the ``JobResult`` record (with stage timings, so
the benchmark reads both workers' records the same way) at ``{prefix}/{job_id}.json``.
A result that already exists is a redelivered job: it acks once the record is there.

``python -m bench.peer`` runs it as its own process, so its CPU is its own. It
builds its clients, prints ``ready`` and waits for a line on stdin before it
subscribes (the benchmark reads its start-up CPU then), prints ``done N`` twice
a second, and once ``--jobs`` jobs are done prints ``finished`` and waits for
stdin to close before it shuts down (the benchmark reads its CPU first).
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np
import requests
import tritonclient.grpc as triton_grpc
from google.api_core import exceptions as api_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1, storage
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler
from PIL import Image

from worker import jobs
from worker.errors import PermanentJobError

#: Messages held and callback threads: the product worker's default in-flight limit.
HELD = 64
#: Seconds between progress lines.
REPORT_INTERVAL_S = 0.5
#: The simulated GPU's tensors (the user knows their model's names).
INPUT_NAME, OUTPUT_NAME = "image", "output"

log = logging.getLogger("bench.peer")


class Peer:
    """Processes the subscription's jobs on callback threads until stopped; counts the jobs it finished."""

    def __init__(self, project: str, triton_url: str, gcs_url: str, jobs_wanted: int) -> None:
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=HELD, pool_maxsize=HELD)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._gcs = storage.Client(
            project=project,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": gcs_url},
            _http=session,
        )
        self._triton = triton_grpc.InferenceServerClient(triton_url)
        self._subscriber = pubsub_v1.SubscriberClient()
        self._changed = threading.Condition()
        self._wanted = jobs_wanted
        self.done = 0
        self.duplicates = 0  # deliveries of jobs an earlier delivery had finished, acked
        self.finished = threading.Event()

    def subscribe(self, subscription: str) -> pubsub_v1.subscriber.futures.StreamingPullFuture:
        return self._subscriber.subscribe(
            subscription,
            callback=self.handle,
            flow_control=pubsub_v1.types.FlowControl(max_messages=HELD),
            scheduler=ThreadScheduler(ThreadPoolExecutor(HELD, thread_name_prefix="callback")),
        )

    def close(self) -> None:
        self._subscriber.close()
        self._triton.close()

    def handle(self, message: pubsub_v1.subscriber.message.Message) -> None:
        try:
            fresh = self._process(message)
        except PermanentJobError:
            log.warning("bad job dropped: %s", message.message_id)
            message.ack()  # bad input never succeeds (the benchmark publishes none)
            return
        except Exception:  # anything else is worth another try: logged (with its traceback), redelivered
            log.exception("job failed, nacked: %s", message.message_id)
            message.nack()
            return
        message.ack()
        with self._changed:
            if fresh:
                self.done += 1
            else:
                self.duplicates += 1
            if self.done >= self._wanted:
                self.finished.set()
            self._changed.notify_all()

    def wait_for_duplicates(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` duplicate deliveries have been acked; ``False`` on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.duplicates >= count, timeout_s)

    def _process(self, message: pubsub_v1.subscriber.message.Message) -> bool:
        """One job, start to end; ``False`` if an earlier delivery had finished it."""
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = round((now - clock) * 1000, 3)
            clock = now

        job = jobs.decode_message(message.data, dict(message.attributes))
        source = jobs.parse_gs_uri(job.input_uri)
        data = self._gcs.bucket(source.bucket).blob(source.name).download_as_bytes()
        lap("fetch")
        with Image.open(io.BytesIO(data)) as opened:
            pixels = np.asarray(opened.convert("RGB"))
        lap("preprocess")
        tensor = triton_grpc.InferInput(INPUT_NAME, [1, *pixels.shape], "UINT8")
        tensor.set_data_from_numpy(pixels[np.newaxis])
        response = self._triton.infer(
            job.model,
            [tensor],
            model_version=job.model_version,
            outputs=[triton_grpc.InferRequestedOutput(OUTPUT_NAME)],
        )
        output = response.as_numpy(OUTPUT_NAME)[0]
        version = response.get_response().model_version
        lap("infer")
        encoded = io.BytesIO()
        Image.fromarray(output).save(encoded, "JPEG", quality=90)
        lap("postprocess")
        target = jobs.parse_gs_uri(job.output_prefix)
        bucket = self._gcs.bucket(target.bucket)
        prefix = target.name.strip("/")
        metadata = {"job_id": job.job_id, "model": job.model, "model_version": version}
        created = _create(bucket, f"{prefix}/{job.job_id}.jpg", encoded.getvalue(), "image/jpeg", metadata)
        lap("write")
        record_name = f"{prefix}/{job.job_id}.json"
        if not created and bucket.blob(record_name).exists():
            return False
        record = jobs.JobResult(
            job_id=job.job_id,
            status=jobs.JobResult.SUCCEEDED,
            model=job.model,
            model_version=version,
            output_uri=f"gs://{target.bucket}/{prefix}/{job.job_id}.jpg",
            output_shape=list(output.shape),
            timings_ms=timings,
            finished_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            message_id=message.message_id,
            delivery_attempt=message.delivery_attempt or 0,
            latency_ms=round(max(0.0, time.time() - message.publish_time.timestamp()) * 1000, 3),
        )
        _create(bucket, record_name, jobs.result_json(record), "application/json", metadata)
        return True


def _create(bucket: storage.Bucket, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> bool:
    """Create ``name`` with ``data``; ``False`` if it already existed."""
    blob = bucket.blob(name)
    blob.metadata = metadata
    try:
        blob.upload_from_string(data, content_type=content_type, if_generation_match=0)
    except api_exceptions.PreconditionFailed:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--subscription", required=True, help="the subscription's full path")
    parser.add_argument("--triton-url", required=True, help="Triton's gRPC host:port")
    parser.add_argument("--gcs-url", required=True, help="the GCS endpoint (the emulator's URL)")
    parser.add_argument("--jobs", type=int, required=True, help="jobs to finish before reporting finished")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    peer = Peer(args.project, args.triton_url, args.gcs_url, args.jobs)
    print("ready", flush=True)
    sys.stdin.readline()
    future = peer.subscribe(args.subscription)
    try:
        while not peer.finished.wait(REPORT_INTERVAL_S):
            print(f"done {peer.done}", flush=True)
            if future.done():
                future.result()  # the stream ended: raise its error
        print(f"done {peer.done}", flush=True)
        print("finished", flush=True)
        sys.stdin.read()  # until the benchmark closes it
    finally:
        future.cancel()
        future.result()
        peer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
