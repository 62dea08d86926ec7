"""Pub/Sub on the event loop: google-cloud-pubsub's subscriber, bridged to the pipeline's queue.

The library owns the protocol: the streaming pull and its reconnections, flow
control (it pauses the stream when full), leases, batched acks and modacks with
their retries, exactly-once confirmations. This module owns the bridge and the
worker's policy:

- **The bridge.** ``LoopScheduler`` runs the library's callback inline on the
  library's thread, and the callback only hands the message to the event loop
  (``call_soon_threadsafe``) as a ``Delivery`` on the bounded delivery queue:
  no thread is parked per message. Acks, nacks and modacks are called from the
  loop; they only queue a request for the library's dispatcher thread.
- **Confirmations.** Acks and nacks go through ``*_with_response``: answered at
  once without exactly-once delivery; with it, by the server, per ack id
  (``AcknowledgeError``, e.g. ``INVALID_ACK_ID``: the lease was lost and the
  message comes back, which the pipeline's records make harmless).
- **Paced redelivery.** With a retry policy on the subscription, Pub/Sub paces
  a nacked message. Without one, its deadline is set to a backoff that doubles
  with its delivery attempt (``nack_hold_s``) and it is dropped from lease
  management, its flow-control slot free meanwhile. Either way an outage of
  seconds does not spend the dead-letter policy's attempts in one second.
- **Fatal errors.** The library ends the subscription on errors retrying
  cannot mend (PERMISSION_DENIED, NOT_FOUND, UNAUTHENTICATED). Some mend by
  themselves (an IAM grant propagating): the consumer subscribes again with
  backoff for ``give_up_after_s``, then gives up and ``on_give_up`` ends the
  worker, so Kubernetes restarts the pod.
- **Ordered stop.** After ``stop_pulling`` what arrives is nacked at once (one
  that comes straight back is kept, leased, and nacked at close, so it cannot
  loop); stream and leases stay up while the pipeline finishes.
  ``wait_closed`` waits for the confirmations, then cancels the subscription
  and waits until the library has sent every queued ack and nack.

The consumer never decides a message's fate; ``pipeline.py`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import structlog
from google.api_core import exceptions
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.exceptions import AcknowledgeError
from google.cloud.pubsub_v1.subscriber.message import Message

from worker import telemetry
from worker.delivery import Delivery, LoopScheduler, nack_hold_s

__all__ = ["Consumer", "Delivery", "LoopScheduler"]

log = structlog.get_logger(__name__)

#: Seconds a message's lease is extended at most while its job runs: a job still running after
#: this is stuck, and Pub/Sub should give its message to another worker.
MAX_LEASE_DURATION_S = 600.0

#: The longest lease one extension grants, in seconds (Pub/Sub's least): how long the messages of a worker
#: that died (SIGKILL, OOM, node loss) stay invisible. The library extends leases well before they end,
#: and raises this to 60 s itself on exactly-once subscriptions, as that feature requires.
LEASE_EXTENSION_S = 10
#: First and longest wait before subscribing again after the library ended the subscription, in seconds.
RESUBSCRIBE_BASE_S = 1.0
RESUBSCRIBE_MAX_S = 30.0
#: Seconds a subscription must live to count as healthy again (idle subscriptions bring no message to say so).
HEALTHY_AFTER_S = 10.0
#: Seconds ``wait_closed`` waits for exactly-once confirmations before it closes anyway (the messages
#: then come back, and their records make the repeat harmless).
CONFIRM_WAIT_S = 10.0
#: Seconds ``get_subscription`` may take at start.
INSPECT_TIMEOUT_S = 10.0


class Consumer:
    """One subscription pulled into ``queue``; ``start()`` once, ``stop_pulling()`` then ``wait_closed()`` to stop.

    ``async with`` starts it and, on leaving, stops it and sends the last acks. Everything but the
    library's callback runs on the event loop that called ``start``.
    """

    def __init__(
        self,
        subscription: str,
        queue: asyncio.Queue[Delivery],
        *,
        max_messages: int,
        max_bytes: int,
        max_lease_duration_s: float = MAX_LEASE_DURATION_S,
        give_up_after_s: float = 300.0,
        on_give_up: Callable[[str], None] | None = None,
        client: pubsub_v1.SubscriberClient | None = None,
    ) -> None:
        self._subscription = subscription
        self._queue = queue
        self._flow_control = pubsub_v1.types.FlowControl(
            max_messages=max_messages,
            max_bytes=max_bytes,
            max_lease_duration=int(max_lease_duration_s),
            max_duration_per_lease_extension=LEASE_EXTENSION_S,
        )
        self._give_up_after_s = give_up_after_s
        self._on_give_up = on_give_up
        self._client = client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._future: futures.Future[Any] | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        #: Reading the subscription's settings, started by ``start``.
        self.inspection: asyncio.Task[None] | None = None
        #: Handed to the pipeline and not yet settled.
        self._out: set[Delivery] = set()
        #: Ack and nack confirmations not yet answered (exactly-once subscriptions).
        self._pending: set[futures.Future[Any]] = set()
        #: Message ids handed back since stopping, and messages that came back anyway (nacked at close).
        self._returned: set[str] = set()
        self._kept: list[Message] = []
        #: Messages that arrived after ``stop_pulling`` (handed back or kept).
        self.handed_back = 0
        #: Whether Pub/Sub paces redeliveries (the subscription has a retry policy).
        self.server_paces = False
        self.exactly_once = False
        self._inspected = False
        self._failing_since: float | None = None
        self._backoff_s = RESUBSCRIBE_BASE_S
        self._stopping = False
        self._closed = False
        #: Why the consumer gave up, once it has.
        self.failure: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("Consumer already started")
        self._loop = asyncio.get_running_loop()
        if self._client is None:
            self._client = pubsub_v1.SubscriberClient()
        self.inspection = asyncio.create_task(self._inspect(), name="pubsub-inspect")
        self._subscribe()
        log.info("consumer_started", subscription=self._subscription)

    async def __aenter__(self) -> Consumer:
        self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.wait_closed()

    @property
    def running(self) -> bool:
        """Pulling: subscribed, not failing, not stopping."""
        return self._future is not None and self._failing_since is None and not self._stopping

    def stop_pulling(self) -> None:
        """Hand out nothing more; what was handed out stays leased until the pipeline settles it."""
        self._stopping = True
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def nack_held(self) -> int:
        """Nack every message still handed out (the end of the grace period); returns how many."""
        held = [d for d in self._out if not d.settled]
        for delivery in held:
            delivery.nack()
        return len(held)

    async def wait_closed(self) -> None:
        """Wait for the confirmations, close the subscription once its queued requests are sent; idempotent."""
        if self._loop is None or self._closed:
            return
        self._closed = True
        self.stop_pulling()
        if self.inspection is not None:
            self.inspection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.inspection
        if self._pending:
            await asyncio.wait([asyncio.wrap_future(f) for f in self._pending], timeout=CONFIRM_WAIT_S)
        for message in self._kept:
            message.nack()
        log.info("consumer_closing", handed_back=self.handed_back, kept=len(self._kept))
        self._kept.clear()
        future, self._future = self._future, None
        if future is not None:
            future.cancel()
            # The library's shutdown sends what its dispatcher holds, then resolves the future.
            await asyncio.to_thread(_wait_resolved, future)
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
        telemetry.MESSAGES_HELD.set(0)

    # -- what the worker reads ---------------------------------------------------------------------

    @property
    def held(self) -> int:
        return len(self._out)

    def oldest_age_s(self) -> float:
        """Age since publish of the oldest message handed out, 0 when none."""
        oldest = min((d.publish_time for d in self._out), default=None)
        return max(0.0, time.time() - oldest) if oldest is not None else 0.0

    # -- the subscription ----------------------------------------------------------------------------

    async def _inspect(self) -> None:
        """Read the subscription's settings: its retry policy and exactly-once delivery shape what a nack does."""
        assert self._client is not None
        client = self._client
        try:
            subscription = await asyncio.to_thread(
                lambda: client.get_subscription(request={"subscription": self._subscription}, timeout=INSPECT_TIMEOUT_S)
            )
        except exceptions.GoogleAPICallError as exc:
            # Not fatal: the stream reports the same errors, and without the settings the worker paces nacks itself.
            log.warning("subscription_unreadable", subscription=self._subscription, error=str(exc))
            return
        self._inspected = True
        self.server_paces = "retry_policy" in subscription
        self.exactly_once = bool(subscription.enable_exactly_once_delivery)
        log.info(
            "subscription_read",
            subscription=self._subscription,
            retry_policy=self.server_paces,
            exactly_once_delivery=self.exactly_once,
            dead_letter_policy="dead_letter_policy" in subscription,
        )

    def _subscribe(self) -> None:
        if self._stopping or self._client is None:
            return
        self._future = self._client.subscribe(
            self._subscription,
            self._on_message,
            flow_control=self._flow_control,
            scheduler=LoopScheduler(),
        )
        future = self._future
        assert self._loop is not None
        loop = self._loop
        future.add_done_callback(lambda done: loop.call_soon_threadsafe(self._ended, done))
        self._later(HEALTHY_AFTER_S, self._healthy, future)

    def _later(self, delay_s: float, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            callback(*args)

        handle = self._loop.call_later(delay_s, fire)
        self._timers.add(handle)

    def _healthy(self, future: futures.Future[Any]) -> None:
        if future is self._future and not future.done():
            self._recovered()

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.info("pubsub_subscription_recovered", failed_for_s=round(time.monotonic() - self._failing_since, 1))
        self._failing_since = None
        self._backoff_s = RESUBSCRIBE_BASE_S
        if not self._inspected and self.inspection is not None and self.inspection.done() and not self._stopping:
            # Read while the subscription failed: read again now that it answers.
            self.inspection = asyncio.create_task(self._inspect(), name="pubsub-inspect")

    def _ended(self, future: futures.Future[Any]) -> None:
        """The library ended the subscription: subscribe again, or give up once it has failed too long."""
        if future is not self._future or self._stopping:
            return
        error = future.exception()
        if error is None:
            return
        code = (
            error.grpc_status_code.name
            if isinstance(error, exceptions.GoogleAPICallError) and error.grpc_status_code
            else type(error).__name__
        )
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        failing_s = now - self._failing_since
        delay_s = min(self._backoff_s, self._give_up_after_s - failing_s)
        if delay_s <= 0:
            self._give_up(f"{code}: {error}", failing_s)
            return
        log.warning(
            "pubsub_subscription_failed",
            code=code,
            error=str(error),
            failing_for_s=round(failing_s, 1),
            give_up_after_s=self._give_up_after_s,
            retry_in_s=round(delay_s, 1),
        )
        self._backoff_s = min(self._backoff_s * 2, RESUBSCRIBE_MAX_S)
        self._later(delay_s, self._subscribe)

    def _give_up(self, reason: str, failing_s: float) -> None:
        self.failure = reason
        log.error(
            "consumer_gave_up",
            subscription=self._subscription,
            reason=reason,
            failing_for_s=round(failing_s, 1),
            hint="check the subscription exists and the worker's service account may consume it",
        )
        if self._on_give_up is not None:
            self._on_give_up(reason)

    # -- messages in ---------------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        """The library's callback, on its thread: hand the message to the loop, nothing more."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._receive, message)

    def _receive(self, message: Message) -> None:
        if self._failing_since is not None:
            self._recovered()
        if self._stopping:
            self._hand_back(message)
            return
        delivery = Delivery(
            message_id=message.message_id,
            data=message.data,
            attributes=dict(message.attributes),
            publish_time=message.publish_time.timestamp(),
            delivery_attempt=message.delivery_attempt,
            message=message,
            _settle=self._settled,
        )
        try:
            self._queue.put_nowait(delivery)
        except asyncio.QueueFull:
            # Flow control bounds what is handed out by the queue's size; a smaller queue is a wiring bug.
            log.error("delivery_queue_full", size=self._queue.qsize())
            self._track("nack", message.nack_with_response())
            return
        self._out.add(delivery)
        telemetry.MESSAGES_HELD.set(len(self._out))

    def _hand_back(self, message: Message) -> None:
        self.handed_back += 1
        if message.message_id in self._returned:
            # Nacked once already and back: keep it leased until close rather than loop it.
            self._kept.append(message)
            return
        self._returned.add(message.message_id)
        self._track("nack", message.nack_with_response())

    # -- messages out ----------------------------------------------------------------------------------

    def _settled(self, delivery: Delivery, acked: bool) -> None:
        self._out.discard(delivery)
        telemetry.MESSAGES_HELD.set(len(self._out))
        message = delivery.message
        if message is None:
            return
        if acked:
            self._track("ack", message.ack_with_response())
        elif self._stopping or self.server_paces:
            self._track("nack", message.nack_with_response())
        else:
            # Back after the backoff: the deadline is the backoff, and the library stops extending it.
            hold_s = round(nack_hold_s(delivery.delivery_attempt))
            self._track("nack", message.modify_ack_deadline_with_response(hold_s))
            message.drop()

    def _track(self, what: str, future: futures.Future[Any]) -> None:
        if future.done():
            self._confirmed(what, future)
            return
        self._pending.add(future)
        assert self._loop is not None
        loop = self._loop
        future.add_done_callback(lambda done: loop.call_soon_threadsafe(self._confirmed, what, done))

    def _confirmed(self, what: str, future: futures.Future[Any]) -> None:
        self._pending.discard(future)
        error = future.exception()
        if error is None:
            return
        telemetry.PUBSUB_REQUEST_ERRORS.labels(what).inc()
        code = error.error_code.name if isinstance(error, AcknowledgeError) else type(error).__name__
        # The message comes back (or was already acked elsewhere): its record makes the repeat harmless.
        log.warning("pubsub_request_failed", request=what, code=code, error=str(error))


def _wait_resolved(future: futures.Future[Any]) -> None:
    with contextlib.suppress(Exception):
        future.result()
