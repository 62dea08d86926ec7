"""``python -m bench.pubsub_clients``: the measurement behind ``worker/consumer.py``'s own streaming pull.

The same backlog of small messages pulled and acked, 64 held at a time, on
Google's Pub/Sub emulator, by two consumers that hand each message to asyncio
and ack it from there, as the worker does:

- google-cloud-pubsub's ``SubscriberClient.subscribe``: its callback thread
  hands the message to the event loop, which acks it;
- ``worker.consumer.Consumer``: the streaming pull on the event loop.

Reports messages per second (the emulator bounds both) and this process's CPU
per message (the difference between them).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from google.cloud import pubsub_v1

from bench import procstat
from worker.consumer import Consumer, Delivery
from worker.stack import PubSubEmulator

MESSAGES = 3000
HELD = 64
PROJECT = "bench"


def _backlog(name: str) -> str:
    """A topic with ``MESSAGES`` published and a subscription to it; returns the subscription's path."""
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, name)
    subscription: str = subscriber.subscription_path(PROJECT, f"{name}-sub")
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=30)
    futures = [publisher.publish(topic, b"x" * 300, job=str(i)) for i in range(MESSAGES)]
    for future in futures:
        future.result()
    subscriber.close()
    return subscription


async def _library(subscription: str) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    subscriber = pubsub_v1.SubscriberClient()
    future = subscriber.subscribe(
        subscription,
        callback=lambda message: loop.call_soon_threadsafe(queue.put_nowait, message),
        flow_control=pubsub_v1.types.FlowControl(max_messages=HELD),
    )
    try:
        for _ in range(MESSAGES):
            (await queue.get()).ack()
    finally:
        future.cancel()
        await asyncio.to_thread(future.result)
        subscriber.close()


async def _own(subscription: str) -> None:
    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    async with Consumer(subscription, queue, max_messages=HELD, max_bytes=10**9, max_lease_duration_s=600):
        for _ in range(MESSAGES):
            (await queue.get()).ack()


async def measure() -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    clients = (("google-cloud-pubsub subscriber", "library", _library), ("worker.consumer", "own", _own))
    for name, topic, consume in clients:
        subscription = await asyncio.to_thread(_backlog, f"clients-{topic}")
        cpu, wall = procstat.own_cpu_seconds(), time.monotonic()
        await consume(subscription)
        cpu, wall = procstat.own_cpu_seconds() - cpu, time.monotonic() - wall
        figures[name] = {"msgs_per_s": round(MESSAGES / wall, 1), "cpu_ms_per_msg": round(cpu * 1000 / MESSAGES, 3)}
        print(f"{name}: {figures[name]}")
    return figures


def main() -> int:
    emulator = PubSubEmulator("pubsub", Path("build/pubsub-clients/logs").resolve())
    emulator.start()
    try:
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        asyncio.run(measure())
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
