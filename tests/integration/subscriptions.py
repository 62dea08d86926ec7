"""What a test's subscription still holds once its jobs are done: read without acking, so it stays."""

from __future__ import annotations

from google.api_core.exceptions import DeadlineExceeded
from google.cloud import pubsub_v1

from worker.config import Settings


def undelivered(settings: Settings) -> int:
    """Messages still in the subscription (pulled without acking, so they stay), up to 100."""
    subscriber = pubsub_v1.SubscriberClient()
    try:
        response = subscriber.pull(request={"subscription": settings.subscription_path, "max_messages": 100}, timeout=5)
        return len(response.received_messages)
    except DeadlineExceeded:
        return 0
    finally:
        subscriber.close()
