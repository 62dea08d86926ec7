"""The consumer against the real Pub/Sub emulator: flow control, paced nacks, leases, acks sent before close."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.api_core.exceptions import DeadlineExceeded
from google.cloud import pubsub_v1

from worker.config import Settings
from worker.consumer import LEASE_EXTENSION_S, Consumer
from worker.delivery import NACK_HOLD_BASE_S, Delivery

#: Seconds any awaited condition may take on a loaded machine.
WAIT_S = 30.0
#: A backlog past the flow-control bound, small enough that the emulator pushes it in one response (the
#: library then holds what does not fit, leased).
MANY = 20


def publish(settings: Settings, count: int) -> list[str]:
    publisher = pubsub_v1.PublisherClient()
    futures = [publisher.publish(settings.topic_path, f"m{i}".encode(), n=str(i)) for i in range(count)]
    return [f.result() for f in futures]


def consumer_for(settings: Settings, queue: asyncio.Queue[Delivery], max_messages: int = 5) -> Consumer:
    return Consumer(
        settings.subscription_path, queue, max_messages=max_messages, max_bytes=10**8, max_lease_duration_s=600
    )


@contextlib.asynccontextmanager
async def consuming(
    settings: Settings, max_messages: int = 5
) -> AsyncIterator[tuple[Consumer, asyncio.Queue[Delivery]]]:
    """A started consumer and its queue; stopped and closed (acks flushed) when the block ends."""
    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    async with consumer_for(settings, queue, max_messages) as consumer:
        yield consumer, queue


async def until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition`` (polled), failing after ``WAIT_S``."""
    async with asyncio.timeout(WAIT_S):
        while not condition():  # noqa: ASYNC110 - the consumer's state has no event to wait on
            await asyncio.sleep(0.02)


def pull_now(settings: Settings) -> list[Any]:
    """Messages a plain synchronous pull finds on the subscription now."""
    subscriber = pubsub_v1.SubscriberClient()
    try:
        response = subscriber.pull(request={"subscription": settings.subscription_path, "max_messages": 100}, timeout=5)
        return list(response.received_messages)
    except DeadlineExceeded:
        return []
    finally:
        subscriber.close()


async def test_flow_control_hands_out_at_most_max_messages(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    await asyncio.to_thread(publish, settings, MANY)
    async with consuming(settings, max_messages=5) as (consumer, queue):
        taken = [await asyncio.wait_for(queue.get(), WAIT_S) for _ in range(5)]
        assert consumer.held == 5
        taken[0].ack()
        taken.append(await asyncio.wait_for(queue.get(), WAIT_S))
        seen = {d.data for d in taken}
        for delivery in taken[1:]:
            delivery.ack()
        while len(seen) < MANY:
            delivery = await asyncio.wait_for(queue.get(), WAIT_S)
            assert consumer.held <= 5
            seen.add(delivery.data)
            delivery.ack()
        assert seen == {f"m{i}".encode() for i in range(MANY)}


async def test_a_nack_comes_back_after_its_backoff_and_frees_its_slot(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    await asyncio.to_thread(publish, settings, 1)
    async with consuming(settings) as (consumer, queue):
        first = await asyncio.wait_for(queue.get(), WAIT_S)
        nacked_at = time.monotonic()
        first.nack()
        assert consumer.held == 0
        again = await asyncio.wait_for(queue.get(), WAIT_S)
        # Pub/Sub keeps it away for its deadline, which the nack set to the backoff (whole seconds).
        assert time.monotonic() - nacked_at >= NACK_HOLD_BASE_S - 0.5
        assert (again.message_id, again.data) == (first.message_id, first.data)
        again.ack()


async def test_leases_outlive_the_ack_deadline_and_acks_are_flushed_on_close(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()  # with a dead-letter policy, so deliveries are counted
    # A backlog, so that messages also wait in the library, leased, while the first five are held.
    await asyncio.to_thread(publish, settings, MANY)
    async with consuming(settings, max_messages=5) as (_, queue):
        held = [await asyncio.wait_for(queue.get(), WAIT_S) for _ in range(5)]
        # Held past the stream's ack deadline, the five handed out and the rest waiting for room:
        # only lease renewals keep any of them from coming back.
        deadline = held[0].received_at + LEASE_EXTENSION_S + 3
        while time.monotonic() < deadline:
            assert queue.qsize() == 0
            await asyncio.sleep(0.2)
        seen = held
        for delivery in held:
            delivery.ack()
        while len(seen) < MANY:
            delivery = await asyncio.wait_for(queue.get(), WAIT_S)
            seen.append(delivery)
            delivery.ack()
    assert len({d.message_id for d in seen}) == MANY
    assert {d.delivery_attempt for d in seen} == {1}
    # Every ack was sent before wait_closed returned, and every deadline has passed: nothing comes back.
    assert await asyncio.to_thread(pull_now, settings) == []


async def test_a_nack_after_stop_goes_back_at_once(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    await asyncio.to_thread(publish, settings, 1)
    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    consumer = consumer_for(settings, queue)
    consumer.start()
    await asyncio.wait_for(queue.get(), WAIT_S)
    consumer.stop_pulling()
    assert consumer.nack_held() == 1
    # Nacked without a backoff, the message is redelivered at once, here on the only stream open (on
    # the service, to another worker's): the stopping consumer hands it back instead of handing it out.
    await until(lambda: consumer.handed_back >= 1)
    assert queue.empty()
    await consumer.wait_closed()
    assert consumer.held == 0


async def test_a_missing_subscription_is_retried_then_given_up(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    gave_up = asyncio.Event()
    missing = Consumer(
        settings.subscription_path + "-missing",
        queue,
        max_messages=5,
        max_bytes=10**8,
        max_lease_duration_s=600,
        give_up_after_s=2.0,
        on_give_up=lambda _: gave_up.set(),
    )
    async with missing as consumer:
        await asyncio.wait_for(gave_up.wait(), WAIT_S)
        assert consumer.failure is not None and "NOT_FOUND" in consumer.failure
        assert not consumer.running
