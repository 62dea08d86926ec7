"""The bridge between google-cloud-pubsub's subscriber and the event loop, without a server.

The messages are the library's own ``Message`` objects, built as its streaming
pull manager builds them, over a plain request queue: what an ack, a nack or a
modack puts there is exactly what the library's dispatcher would send. The
client is a stand-in for ``SubscriberClient`` that records ``subscribe`` and
``close`` and whose subscription futures end when told to. The consumer runs
against the real emulator in ``tests/integration/test_consumer.py``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import pytest
from google.api_core import exceptions
from google.cloud.pubsub_v1.subscriber._protocol import requests
from google.cloud.pubsub_v1.subscriber.exceptions import AcknowledgeError, AcknowledgeStatus
from google.cloud.pubsub_v1.subscriber.message import Message
from google.protobuf import timestamp_pb2
from google.pubsub_v1 import types

from worker.consumer import Consumer
from worker.delivery import Delivery, LoopScheduler, nack_hold_s

SUBSCRIPTION = "projects/p/subscriptions/s"
#: Seconds any awaited hand-off may take.
WAIT_S = 5.0


class StreamFuture(futures.Future[Any]):
    """A subscription's future: ``cancel`` records itself (with the requests queued by then) and resolves it."""

    def __init__(self, log: list[Any], requests_queued: Callable[[], int]) -> None:
        super().__init__()
        self._log = log
        self._requests_queued = requests_queued

    def cancel(self) -> bool:
        self._log.append(("cancel", self._requests_queued()))
        if not self.done():
            self.set_result(True)
        return True


class Client:
    """What the consumer calls on ``SubscriberClient``: subscribe, get_subscription, close."""

    def __init__(self, subscription: types.Subscription | None = None, fail_with: Exception | None = None) -> None:
        self.subscription = subscription or types.Subscription(name=SUBSCRIPTION)
        self.fail_with = fail_with
        self.requests: queue.Queue[Any] = queue.Queue()
        self.log: list[Any] = []
        self.callback: Callable[[Message], None] | None = None
        self.scheduler: Any = None

    def subscribe(self, subscription: str, callback: Callable[[Message], None], **kwargs: Any) -> StreamFuture:
        self.log.append("subscribe")
        self.callback = callback
        self.scheduler = kwargs["scheduler"]
        future = StreamFuture(self.log, self.requests.qsize)
        if self.fail_with is not None:
            future.set_exception(self.fail_with)
        return future

    def get_subscription(self, request: dict[str, str], timeout: float) -> types.Subscription:
        return self.subscription

    def close(self) -> None:
        self.log.append("close")

    def message(self, n: int = 1, attempt: int = 0, exactly_once: bool = False) -> Message:
        """A message as the library hands it to the callback."""
        raw = types.PubsubMessage(
            data=f"m{n}".encode(),
            message_id=str(n),
            attributes={"priority": "high"},
            publish_time=timestamp_pb2.Timestamp(seconds=1_700_000_000 + n),
        )._pb
        return Message(raw, f"ack-{n}", attempt, self.requests, lambda: exactly_once)

    def deliver_from_a_thread(self, message: Message) -> None:
        """Call the consumer's callback as the library does: through the scheduler, on another thread."""
        assert self.callback is not None
        thread = threading.Thread(target=self.scheduler.schedule, args=(self.callback, message))
        thread.start()
        thread.join()

    def sent(self) -> list[Any]:
        out = []
        while not self.requests.empty():
            out.append(self.requests.get_nowait())
        return out


async def started(client: Client, **kwargs: Any) -> tuple[Consumer, asyncio.Queue[Delivery]]:
    deliveries: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=5)
    consumer = Consumer(
        SUBSCRIPTION, deliveries, max_messages=5, max_bytes=10**6, max_lease_duration_s=600, client=client, **kwargs
    )  # type: ignore[arg-type]
    consumer.start()
    assert consumer.inspection is not None
    await consumer.inspection
    return consumer, deliveries


def test_the_scheduler_runs_the_callback_inline_and_keeps_nothing() -> None:
    seen: list[tuple[str, threading.Thread]] = []
    scheduler = LoopScheduler()
    scheduler.schedule(lambda x: seen.append((x, threading.current_thread())), "m")
    assert seen == [("m", threading.current_thread())]
    assert scheduler.shutdown(await_msg_callbacks=True) == []


def test_nack_backoff_doubles_per_attempt_up_to_its_cap() -> None:
    assert [nack_hold_s(a) for a in (None, 1, 2, 3, 4, 5, 50)] == [2.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


async def test_a_message_from_the_librarys_thread_reaches_the_queue_on_the_loop() -> None:
    client = Client()
    consumer, deliveries = await started(client)
    client.deliver_from_a_thread(client.message(7, attempt=2))
    delivery = await asyncio.wait_for(deliveries.get(), WAIT_S)
    assert (delivery.message_id, delivery.data, delivery.delivery_attempt) == ("7", b"m7", 2)
    assert delivery.attributes == {"priority": "high"}
    assert delivery.publish_time == 1_700_000_007
    assert consumer.held == 1 and consumer.running
    await consumer.wait_closed()


async def test_an_ack_from_the_loop_queues_the_librarys_ack() -> None:
    client = Client()
    consumer, deliveries = await started(client)
    client.deliver_from_a_thread(client.message(1))
    (await asyncio.wait_for(deliveries.get(), WAIT_S)).ack()
    sent = client.sent()
    assert [type(r) for r in sent] == [requests.AckRequest] and sent[0].ack_id == "ack-1"
    assert consumer.held == 0
    await consumer.wait_closed()


async def test_a_nack_without_a_retry_policy_comes_back_after_its_backoff() -> None:
    client = Client()
    consumer, deliveries = await started(client)
    assert not consumer.server_paces
    client.deliver_from_a_thread(client.message(1, attempt=3))
    (await asyncio.wait_for(deliveries.get(), WAIT_S)).nack()
    modack, drop = client.sent()
    # The deadline becomes the backoff, and the library stops extending it: the flow-control slot is free.
    assert isinstance(modack, requests.ModAckRequest) and modack.seconds == nack_hold_s(3) == 8.0
    assert isinstance(drop, requests.DropRequest) and drop.ack_id == "ack-1"
    assert consumer.held == 0
    await consumer.wait_closed()


async def test_a_nack_with_a_retry_policy_goes_back_at_once() -> None:
    subscription = types.Subscription(name=SUBSCRIPTION, retry_policy=types.RetryPolicy())
    client = Client(subscription)
    consumer, deliveries = await started(client)
    assert consumer.server_paces
    client.deliver_from_a_thread(client.message(1, attempt=3))
    (await asyncio.wait_for(deliveries.get(), WAIT_S)).nack()
    assert [type(r) for r in client.sent()] == [requests.NackRequest]
    await consumer.wait_closed()


async def test_after_stop_arrivals_go_back_at_once_and_one_that_returns_is_kept_until_close() -> None:
    client = Client()
    consumer, deliveries = await started(client)
    client.deliver_from_a_thread(client.message(1))
    held = await asyncio.wait_for(deliveries.get(), WAIT_S)
    consumer.stop_pulling()
    assert not consumer.running
    late = client.message(2)
    client.deliver_from_a_thread(late)
    client.deliver_from_a_thread(client.message(2))  # nacked, and straight back on the same stream
    # The hand-offs run in order on the loop: a marker scheduled after them runs after them.
    marker = asyncio.Event()
    asyncio.get_running_loop().call_soon_threadsafe(marker.set)
    await marker.wait()
    assert deliveries.empty() and consumer.handed_back == 2
    sent = client.sent()
    assert [(type(r), r.ack_id) for r in sent] == [(requests.NackRequest, "ack-2")]
    # The held job finishes within the grace period: its ack goes out while the subscription is up.
    held.ack()
    await consumer.wait_closed()
    sent = client.sent()
    assert [type(r) for r in sent] == [requests.AckRequest, requests.NackRequest]
    # The kept message's nack and the ack were queued before the subscription was cancelled, then closed.
    assert client.log == ["subscribe", ("cancel", 2), "close"]


async def test_close_waits_for_exactly_once_confirmations_then_cancels() -> None:
    client = Client(types.Subscription(name=SUBSCRIPTION, enable_exactly_once_delivery=True))
    consumer, deliveries = await started(client)
    assert consumer.exactly_once
    client.deliver_from_a_thread(client.message(1, exactly_once=True))
    (await asyncio.wait_for(deliveries.get(), WAIT_S)).ack()
    closing = asyncio.create_task(consumer.wait_closed())
    # Unconfirmed, the close does not go on (a negative check: it would otherwise finish at once).
    done, _ = await asyncio.wait({closing}, timeout=0.3)
    assert not done and "close" not in client.log
    (ack,) = client.sent()
    threading.Thread(target=ack.future.set_result, args=(AcknowledgeStatus.SUCCESS,)).start()
    await asyncio.wait_for(closing, WAIT_S)
    assert client.log == ["subscribe", ("cancel", 0), "close"]


async def test_a_failed_exactly_once_ack_is_counted_not_raised() -> None:
    from worker import telemetry

    client = Client()
    consumer, deliveries = await started(client)
    client.deliver_from_a_thread(client.message(1, exactly_once=True))
    (await asyncio.wait_for(deliveries.get(), WAIT_S)).ack()
    (ack,) = client.sent()
    before = telemetry.PUBSUB_REQUEST_ERRORS.labels("ack")._value.get()
    ack.future.set_exception(AcknowledgeError(AcknowledgeStatus.INVALID_ACK_ID, info=None))
    await asyncio.wait_for(consumer.wait_closed(), WAIT_S)
    assert telemetry.PUBSUB_REQUEST_ERRORS.labels("ack")._value.get() == before + 1


@pytest.mark.parametrize("error", [exceptions.NotFound("no such subscription"), exceptions.PermissionDenied("not yet")])
async def test_a_subscription_that_keeps_failing_is_retried_then_given_up(error: Exception) -> None:
    client = Client(fail_with=error)
    gave_up = asyncio.Event()
    reasons: list[str] = []

    def give_up(reason: str) -> None:
        reasons.append(reason)
        gave_up.set()

    consumer, _ = await started(client, give_up_after_s=0.2, on_give_up=give_up)
    await asyncio.wait_for(gave_up.wait(), WAIT_S)
    assert client.log.count("subscribe") >= 2  # subscribed again within the window before giving up
    assert consumer.failure == reasons[0] and error.grpc_status_code.name in reasons[0]  # type: ignore[attr-defined]
    assert not consumer.running
    await consumer.wait_closed()


async def test_a_message_after_failures_marks_the_subscription_healthy() -> None:
    client = Client(fail_with=exceptions.PermissionDenied("not yet"))
    consumer, deliveries = await started(client, give_up_after_s=60)
    subscribed_again = asyncio.Event()
    original = client.subscribe

    def subscribe(*args: Any, **kwargs: Any) -> StreamFuture:
        client.fail_with = None  # the grant has propagated
        subscribed_again.set()
        return original(*args, **kwargs)

    client.subscribe = subscribe  # type: ignore[method-assign]
    await asyncio.wait_for(subscribed_again.wait(), WAIT_S)
    assert not consumer.running  # still counted as failing: nothing has come through yet
    client.deliver_from_a_thread(client.message(1))
    await asyncio.wait_for(deliveries.get(), WAIT_S)
    assert consumer.running and consumer.failure is None
    await consumer.wait_closed()


async def test_settings_unreadable_while_failing_are_read_once_the_subscription_answers() -> None:
    client = Client(types.Subscription(name=SUBSCRIPTION, retry_policy=types.RetryPolicy()))
    unreadable = True
    readable = client.get_subscription

    def get_subscription(request: dict[str, str], timeout: float) -> types.Subscription:
        if unreadable:
            raise exceptions.PermissionDenied("not yet")
        return readable(request, timeout)

    client.get_subscription = get_subscription  # type: ignore[method-assign]
    client.fail_with = exceptions.PermissionDenied("not yet")
    consumer, deliveries = await started(client, give_up_after_s=60)
    assert not consumer.server_paces  # unknown: the worker paces nacks itself
    unreadable, client.fail_with = False, None
    # The failed subscription is retried after its backoff; the first message marks it healthy.
    subscribed_again = asyncio.Event()
    original = client.subscribe

    def subscribe(*args: Any, **kwargs: Any) -> StreamFuture:
        subscribed_again.set()
        return original(*args, **kwargs)

    client.subscribe = subscribe  # type: ignore[method-assign]
    await asyncio.wait_for(subscribed_again.wait(), WAIT_S)
    client.deliver_from_a_thread(client.message(1))
    await asyncio.wait_for(deliveries.get(), WAIT_S)
    assert consumer.inspection is not None
    await consumer.inspection
    assert consumer.server_paces
    await consumer.wait_closed()
