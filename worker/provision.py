"""Creating what the worker needs before it runs: the jobs topic, its subscription, the dead-letter topic, buckets.

``tritonq init`` runs this once per environment (the compose file's one-shot
``init`` service, or a developer's shell); the local stack in ``devstack``
uses the same code, so what the tests run against is what ``init`` creates.
Every step is idempotent: an existing topic, subscription or bucket is left
as it is. The Pub/Sub client reads ``PUBSUB_EMULATOR_HOST`` itself, so the
same calls provision the emulator or the real service.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from typing import Any

from worker.config import Settings

#: Seconds a subscriber has to ack before redelivery: long enough for a GPU batch; the client extends leases beyond it.
ACK_DEADLINE_S = 60
#: Seconds a bucket creation may take on the emulator.
BUCKET_TIMEOUT_S = 10


class ProvisionError(RuntimeError):
    """A topic, subscription or bucket could not be created."""


def provision_pubsub(settings: Settings, *, dead_letter: bool = True) -> None:
    """Create the jobs topic, dead-letter topic and subscription if missing (idempotent).

    The subscription has a dead-letter policy and no retry policy, unlike the
    production one (README, Deploy): Google's emulator, given both a retry and
    a dead-letter policy, never redelivers a message whose holder died or whose
    stream closed, which would turn every worker crash or restart into lost
    jobs locally. Without a retry policy the worker paces redeliveries itself
    (a nacked message's deadline is set to a backoff, ``worker/consumer.py``).
    ``dead_letter=False`` leaves the dead-letter policy off too, for the fault
    scenarios that stop workers: with one, the emulator also never redelivers
    a message orphaned twice (redelivered, then its second holder killed), nor
    one nacked after its stream closed (a SIGTERM), as real Pub/Sub does.
    """
    from google.api_core import exceptions
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    dead_letter_topic = publisher.topic_path(settings.project, settings.dead_letter_topic)
    for topic in (settings.topic_path, dead_letter_topic):
        with contextlib.suppress(exceptions.AlreadyExists):
            publisher.create_topic(name=topic)
    dead_letter_sub = subscriber.subscription_path(settings.project, settings.dead_letter_topic)
    with contextlib.suppress(exceptions.AlreadyExists):
        subscriber.create_subscription(name=dead_letter_sub, topic=dead_letter_topic)
    request: dict[str, Any] = {
        "name": settings.subscription_path,
        "topic": settings.topic_path,
        "ack_deadline_seconds": ACK_DEADLINE_S,
    }
    if dead_letter:
        request["dead_letter_policy"] = {
            "dead_letter_topic": dead_letter_topic,
            "max_delivery_attempts": settings.max_delivery_attempts,
        }
    with contextlib.suppress(exceptions.AlreadyExists):
        subscriber.create_subscription(request=request)
    if settings.results_topic:
        results = settings.results_topic_path
        with contextlib.suppress(exceptions.AlreadyExists):
            publisher.create_topic(name=results)
        with contextlib.suppress(exceptions.AlreadyExists):
            subscriber.create_subscription(
                name=subscriber.subscription_path(settings.project, f"{settings.results_topic}-sub"), topic=results
            )
    subscriber.close()


def create_bucket(gcs_url: str, project: str, bucket: str, *, versioned: bool = False) -> None:
    """Create a bucket through the JSON API at ``gcs_url`` (an emulator's); an existing one is fine.

    Real buckets are created once, with their IAM (README, Deploy): only an
    emulator starts empty, so only an emulator's URL is ever passed here.
    """
    body: dict[str, Any] = {"name": bucket}
    if versioned:
        body["versioning"] = {"enabled": True}
    request = urllib.request.Request(
        f"{gcs_url}/storage/v1/b?project={project}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=BUCKET_TIMEOUT_S):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code != 409:
            raise ProvisionError(f"creating bucket {bucket}: HTTP {exc.code}") from exc
