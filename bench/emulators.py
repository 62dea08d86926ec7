"""The emulators' own speed, so a reader can see the stack stayed put while a benchmark filled it.

- ``gcs_upload_rate``: create-only multipart uploads of small objects, one
  after another over one kept-alive connection, into a bucket of the probe's
  own: the request the worker makes for every result and record, with nothing
  of the worker's in the way.
- ``pubsub_round_trip_rate``: a topic and subscription made for the probe,
  messages published, pulled and acked, then both deleted, so the probe leaves
  nothing behind that could slow the emulator itself.
- ``python -m bench.emulators``: the fill curve. It starts the two emulators
  exactly as the stack starts them and measures uploads/s as one bucket fills,
  and Pub/Sub's round trip before and after many topics, subscriptions and
  messages have passed through it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devstack.stack import Stack, temporary_env
from worker.provision import create_bucket

#: Uploads per probe: a few hundred is a stable rate and costs well under a second or two.
PROBE_UPLOADS = 300
#: Bytes per probe object: a result record's size.
PROBE_OBJECT_BYTES = 2_000
#: Messages per Pub/Sub probe.
PROBE_MESSAGES = 2_000
#: Messages the Pub/Sub probe sends first and discards, per round: the emulator's JVM is still
#: compiling its hot paths for its first tens of thousands of messages, and its rate climbs meanwhile.
WARM_UP_MESSAGES = 10_000
#: Rounds per probe, of which the median is kept: one round can land on another process's burst.
PROBE_ROUNDS = 5
#: Bucket fills at which the fill curve measures.
FILL_POINTS = (1_000, 2_000, 4_000, 6_000, 8_000, 10_000, 12_000)
#: Topics and subscriptions (each with its messages, acked) the Pub/Sub curve creates between its probes.
PUBSUB_FILL_TOPICS = 200
PUBSUB_FILL_MESSAGES_PER_TOPIC = 50
#: The multipart boundary: never occurs in the probe's own bytes.
_BOUNDARY = "tritonq-probe-boundary"


def _multipart(name: str, data: bytes) -> bytes:
    head = (
        f"--{_BOUNDARY}\r\nContent-Type: application/json\r\n\r\n{json.dumps({'name': name})}\r\n"
        f"--{_BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{_BOUNDARY}--\r\n".encode()


class GcsUploader:
    """Create-only uploads into one bucket over one kept-alive HTTP connection."""

    def __init__(self, gcs_url: str, bucket: str) -> None:
        parsed = urllib.parse.urlsplit(gcs_url)
        self.connection = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=30)
        self.path = f"/upload/storage/v1/b/{bucket}/o?uploadType=multipart&ifGenerationMatch=0"
        self.body = b"x" * PROBE_OBJECT_BYTES

    def upload(self, name: str) -> None:
        headers = {"Content-Type": f"multipart/related; boundary={_BOUNDARY}"}
        self.connection.request("POST", self.path, _multipart(name, self.body), headers)
        response = self.connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"upload of {name}: HTTP {response.status}")

    def rate(self, count: int, prefix: str) -> float:
        """Uploads per second of ``count`` new objects named under ``prefix``: the median of the rounds."""
        rates = []
        for round_ in range(PROBE_ROUNDS):
            started = time.perf_counter()
            for i in range(count):
                self.upload(f"{prefix}/{round_}-{i:06d}.json")
            rates.append(count / (time.perf_counter() - started))
        return statistics.median(rates)

    def close(self) -> None:
        self.connection.close()


def gcs_upload_rate(gcs_url: str, project: str, count: int = PROBE_UPLOADS) -> float:
    """Uploads/s into a fresh bucket of the probe's own (left behind: it holds ``count`` small objects)."""
    bucket = f"probe-{uuid.uuid4().hex[:12]}"
    create_bucket(gcs_url, project, bucket)
    uploader = GcsUploader(gcs_url, bucket)
    try:
        return uploader.rate(count, "probe")
    finally:
        uploader.close()


def pubsub_round_trip_rate(emulator_host: str, project: str, count: int = PROBE_MESSAGES) -> float:
    """Messages/s published, pulled and acked through a topic and subscription the probe then deletes.

    The median of ``PROBE_ROUNDS`` rounds on one topic.
    """
    from google.cloud import pubsub_v1

    name = f"probe-{uuid.uuid4().hex[:12]}"
    with temporary_env({"PUBSUB_EMULATOR_HOST": emulator_host}):
        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        topic = publisher.topic_path(project, name)
        subscription = subscriber.subscription_path(project, name)
        publisher.create_topic(name=topic)
        subscriber.create_subscription(name=subscription, topic=topic)
        try:
            rates = []
            for _ in range(PROBE_ROUNDS):
                started = time.perf_counter()
                _publish_and_drain(publisher, subscriber, topic, subscription, count)
                rates.append(count / (time.perf_counter() - started))
            return statistics.median(rates)
        finally:
            subscriber.delete_subscription(subscription=subscription)
            publisher.delete_topic(topic=topic)
            subscriber.close()


def _publish_and_drain(publisher: Any, subscriber: Any, topic: str, subscription: str, count: int) -> None:
    """Publish ``count`` messages, then pull and ack until all of them came back."""
    for future in [publisher.publish(topic, f"probe {i}".encode()) for i in range(count)]:
        future.result(timeout=60)
    received = 0
    deadline = time.monotonic() + 60
    while received < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pulled {received} of {count} probe messages in 60 s")
        response = subscriber.pull(subscription=subscription, max_messages=1000, timeout=30)
        ack_ids = [m.ack_id for m in response.received_messages]
        if ack_ids:
            subscriber.acknowledge(subscription=subscription, ack_ids=ack_ids)
        received += len(ack_ids)


def probe(stack: Stack, project: str, *, warm_up: bool = False) -> dict[str, float]:
    """Both rates, once: what the benchmark records at its start (warmed up first) and at its end."""
    if warm_up:
        gcs_upload_rate(stack.gcs.url, project)
        pubsub_round_trip_rate(stack.pubsub.host, project, WARM_UP_MESSAGES)
    return {
        "gcs_uploads_per_s": round(gcs_upload_rate(stack.gcs.url, project), 1),
        "pubsub_round_trip_msgs_per_s": round(pubsub_round_trip_rate(stack.pubsub.host, project), 1),
    }


def gcs_fill_curve(gcs_url: str, project: str, points: Sequence[int] = FILL_POINTS) -> list[dict[str, float]]:
    """Uploads/s of a probe's worth of objects once one bucket holds each of ``points`` objects."""
    gcs_upload_rate(gcs_url, project)  # warm-up: the first uploads of a new process are slower
    bucket = f"fill-{uuid.uuid4().hex[:12]}"
    create_bucket(gcs_url, project, bucket)
    uploader = GcsUploader(gcs_url, bucket)
    curve = []
    stored = 0
    try:
        for point in points:
            for i in range(stored, point):
                uploader.upload(f"fill/{i:06d}.json")
            stored = point
            rate = uploader.rate(PROBE_UPLOADS, f"probe-{point}")
            stored += PROBE_UPLOADS * PROBE_ROUNDS
            curve.append({"objects": point, "uploads_per_s": round(rate, 1)})
            print(f"gcs: {point:>6} objects in the bucket: {rate:7.1f} uploads/s", flush=True)
    finally:
        uploader.close()
    return curve


def pubsub_fill(emulator_host: str, project: str) -> dict[str, Any]:
    """Pub/Sub's round trip on a fresh emulator, then after many topics and subscriptions came and stayed."""
    from google.cloud import pubsub_v1

    pubsub_round_trip_rate(emulator_host, project, WARM_UP_MESSAGES)
    before = pubsub_round_trip_rate(emulator_host, project)
    print(f"pubsub: fresh emulator: {before:7.1f} msgs/s", flush=True)
    with temporary_env({"PUBSUB_EMULATOR_HOST": emulator_host}):
        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        for k in range(PUBSUB_FILL_TOPICS):
            topic = publisher.topic_path(project, f"fill-{k}")
            subscription = subscriber.subscription_path(project, f"fill-{k}")
            publisher.create_topic(name=topic)
            subscriber.create_subscription(name=subscription, topic=topic)
            _publish_and_drain(publisher, subscriber, topic, subscription, PUBSUB_FILL_MESSAGES_PER_TOPIC)
        subscriber.close()
    after = pubsub_round_trip_rate(emulator_host, project)
    total = PUBSUB_FILL_TOPICS * PUBSUB_FILL_MESSAGES_PER_TOPIC
    print(f"pubsub: after {PUBSUB_FILL_TOPICS} topics and {total} messages: {after:7.1f} msgs/s", flush=True)
    return {
        "fresh_msgs_per_s": round(before, 1),
        "filled_msgs_per_s": round(after, 1),
        "topics_left": PUBSUB_FILL_TOPICS,
        "messages_passed": total,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.emulators", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/emulators.json"))
    parser.add_argument("--project", default="local-project")
    parser.add_argument(
        "--gcs-backend", choices=("filesystem", "memory"), default="filesystem", help="default: the stack's"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="tritonq-emulators-") as state:
        stack = Stack(state_dir=Path(state), gcs_backend=args.gcs_backend)
        try:
            for component in (stack.pubsub, stack.gcs):
                component.start()
            print(f"gcs backend: {stack.gcs.backend}, objects in {stack.gcs.data_dir}", flush=True)
            curve = gcs_fill_curve(stack.gcs.url, args.project)
            pubsub = pubsub_fill(stack.pubsub.host, args.project)
        finally:
            stack.stop()
    first, last = curve[0]["uploads_per_s"], next(p for p in curve if p["objects"] == 10_000)["uploads_per_s"]
    ratio = round(pubsub["filled_msgs_per_s"] / pubsub["fresh_msgs_per_s"], 3)
    doc = {
        "gcs_backend": stack.gcs.backend,
        "gcs_fill_curve": curve,
        "gcs_10k_vs_1k": round(last / first, 3),
        "pubsub": {**pubsub, "filled_vs_fresh": ratio},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"gcs: 10,000 objects against 1,000: {doc['gcs_10k_vs_1k']:.2f}x; "
        f"pubsub filled against fresh: {ratio:.2f}x; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
