"""Pub/Sub streaming pull bridged into asyncio: flow control, leases, ack/nack, and an ordered stop.

google-cloud-pubsub runs a streaming pull with flow control (``max_messages``,
``max_bytes``) and extends the lease of every message it holds, up to
``max_lease_duration``. Its callbacks run on its own threads; each one hands a
``Delivery`` to the asyncio side through a bounded queue and then *waits until
the pipeline settles it* (ack or nack). Holding the callback is what makes the
shutdown ordered: stopping the pull future stops pulling at once, waits for
held callbacks (our in-flight jobs), nacks what was never handed out, and
flushes acks and nacks before the client closes.

Nacks are paced. A message the pipeline nacks while the worker runs keeps
its lease and its flow-control slot for a backoff that doubles with its
delivery attempt (``NACK_HOLD_BASE_S`` .. ``NACK_HOLD_MAX_S``) before it is
handed back. Transient failures are mostly outages (storage or Triton down for
seconds), and each redelivery spends one of the subscription's
``max_delivery_attempts``: handed back at once, a message burns its five
attempts in the first seconds of a 10 s outage and is dead-lettered although
nothing is wrong with it (the chaos scenario ``storage_outage`` showed it).
Held slots also stop the pull, so an outage is backpressure, not churn.
Pub/Sub's retry policy would space redeliveries server-side, but its backoff
starts at a second and the emulator ignores it. Once stopping, nacks go out at
once: shutdown must not wait on a backoff.

The consumer never decides a message's fate; ``pipeline.py`` does, through
``Delivery.ack`` / ``Delivery.nack``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

from worker import telemetry

log = structlog.get_logger(__name__)

#: Seconds one lease extension lasts (the client's ``max_duration_per_lease_extension``,
#: which also sets the streaming pull's ack deadline). Leases are renewed before
#: this runs out, up to ``max_lease_duration``; what it bounds is how long the
#: messages of a worker that died (SIGKILL, OOM, node loss) stay invisible.
#: Unset, the client stretches each extension to its ack-time p99, which with a
#: backlog reaches minutes; on the emulator a killed worker's messages then
#: waited 60 s or more (never, within 150 s, with a dead-letter policy). 10 s,
#: the least allowed, brought them back in about 9 s. The price, measured: the
#: client renews at a random point up to 90% of the extension, so with 5,000
#: messages on hold (the emulator ignores the stream's flow control) some
#: renewals came late and those copies were redelivered and dead-lettered,
#: while the worker still finished every job once. 30 s removed that but made
#: the crash scenarios wait for half-minute leases (and flaky on the emulator).
LEASE_EXTENSION_S = 10

#: Seconds a nacked message is held before it is handed back, on its first
#: delivery; doubled on each later one. Attempts 1 to 4 wait 2, 4, 8 and 16 s,
#: so a message meets a fifth delivery (the default dead-letter threshold) only
#: after about 30 s of failures, not after one second.
NACK_HOLD_BASE_S = 2.0
#: The longest hold, in seconds: well within the client's lease extension, and
#: short enough that one slot held by a failing message costs little throughput.
NACK_HOLD_MAX_S = 30.0


def nack_hold_s(delivery_attempt: int | None) -> float:
    """How long a message nacked on this delivery attempt is held before it is handed back."""
    attempt = max(1, delivery_attempt or 1)
    return float(min(NACK_HOLD_MAX_S, NACK_HOLD_BASE_S * 2 ** (attempt - 1)))


@dataclass
class Delivery:
    """One received message, until the pipeline acks or nacks it."""

    message_id: str
    data: bytes
    attributes: Mapping[str, str]
    publish_time: float  # seconds since the epoch
    delivery_attempt: int | None
    _message: Any = field(repr=False)
    _settled: threading.Event = field(default_factory=threading.Event, repr=False)
    _nacked: bool = field(default=False, repr=False)
    received_at: float = field(default_factory=time.monotonic)

    @classmethod
    def from_message(cls, message: Any) -> Delivery:
        return cls(
            message_id=message.message_id,
            data=message.data,
            attributes=dict(message.attributes),
            publish_time=message.publish_time.timestamp(),
            delivery_attempt=message.delivery_attempt,
            _message=message,
        )

    @property
    def settled(self) -> bool:
        return self._settled.is_set()

    @property
    def nacked(self) -> bool:
        """Settled by ``nack``: the consumer hands the message back (after its hold)."""
        return self._nacked

    def ack(self) -> None:
        if not self._settled.is_set():
            self._message.ack()
            self._settled.set()

    def nack(self) -> None:
        """Give the message back for redelivery; the consumer's callback thread sends the nack."""
        if not self._settled.is_set():
            self._nacked = True
            self._settled.set()

    def wait_settled(self) -> None:
        self._settled.wait()


class Consumer:
    """Streaming pull of one subscription into ``queue``; ``start()`` once, ``stop()`` to stop pulling."""

    def __init__(
        self,
        subscription: str,
        queue: asyncio.Queue[Delivery],
        *,
        max_messages: int,
        max_bytes: int,
        max_lease_duration_s: float,
    ) -> None:
        self._subscription = subscription
        self._queue = queue
        self._flow_control = pubsub_v1.types.FlowControl(
            max_messages=max_messages,
            max_bytes=max_bytes,
            max_lease_duration=int(max_lease_duration_s),
            max_duration_per_lease_extension=LEASE_EXTENSION_S,
        )
        # One thread per message held: each callback waits for its message to be settled.
        self._executor = ThreadPoolExecutor(max_workers=max_messages + 2, thread_name_prefix="pubsub-callback")
        self._client: pubsub_v1.SubscriberClient | None = None
        self._future: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Keyed by identity, not message id: a redelivery may arrive while the first delivery is held.
        self._held: dict[int, Delivery] = {}
        self._lock = threading.Lock()
        #: Set when pulling stops: nacks held for their backoff go out at once.
        self._stopping = threading.Event()
        self.running = False

    def start(self) -> None:
        if self._future is not None:
            raise RuntimeError("Consumer already started")
        self._loop = asyncio.get_running_loop()
        self._client = pubsub_v1.SubscriberClient()
        self._future = self._client.subscribe(
            self._subscription,
            callback=self._on_message,
            flow_control=self._flow_control,
            scheduler=ThreadScheduler(executor=self._executor),
            await_callbacks_on_shutdown=True,
        )
        self._future.add_done_callback(self._on_done)
        self.running = True
        log.info("consumer_started", subscription=self._subscription)

    def _on_message(self, message: Any) -> None:
        # Runs on a Pub/Sub callback thread.
        delivery = Delivery.from_message(message)
        assert self._loop is not None
        with self._lock:
            # Once stopping, nothing new is taken on: the client still dispatches what it had
            # on hold, and a message queued after the pipeline stopped would never be settled,
            # blocking this thread and with it the client's close (the SIGTERM scenario hung so).
            stopping = self._stopping.is_set()
            if not stopping:
                self._held[id(delivery)] = delivery
                telemetry.MESSAGES_HELD.set(len(self._held))
        if stopping:
            message.nack()
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delivery)
        except RuntimeError:
            self._stopping.set()  # the event loop is gone: hand it back now
            delivery.nack()
        delivery.wait_settled()
        if delivery.nacked:
            # Hold the lease (and the flow-control slot) for the backoff; stopping cuts it short.
            self._stopping.wait(nack_hold_s(delivery.delivery_attempt))
            message.nack()
        with self._lock:
            self._held.pop(id(delivery), None)
            telemetry.MESSAGES_HELD.set(len(self._held))

    def _on_done(self, future: Any) -> None:
        self.running = False
        if not future.cancelled() and future.exception() is not None:
            log.error("consumer_stopped", error=str(future.exception()))

    def oldest_age_s(self) -> float:
        """Age since publish of the oldest message held, 0 when none."""
        with self._lock:
            oldest = min((d.publish_time for d in self._held.values()), default=None)
        return max(0.0, time.time() - oldest) if oldest is not None else 0.0

    @property
    def held(self) -> int:
        return len(self._held)

    def stop_pulling(self) -> None:
        """Stop receiving; held messages stay held until the pipeline settles them."""
        with self._lock:
            self._stopping.set()
        if self._future is not None and self.running:
            self._future.cancel()
        self.running = False

    def nack_held(self) -> int:
        """Nack every message still held (the end of the grace period); returns how many."""
        with self._lock:
            held = list(self._held.values())
        for delivery in held:
            delivery.nack()
        return len(held)

    async def wait_closed(self) -> None:
        """Wait for the client to flush acks and nacks and close; idempotent."""
        if self._future is None:
            return
        future, self._future = self._future, None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _result_quietly, future)
        if self._client is not None:
            self._client.close()
            self._client = None
        self._executor.shutdown(wait=False)


def _result_quietly(future: Any) -> None:
    try:
        future.result()
    except Exception as exc:  # noqa: BLE001 - the stream's own error was logged by _on_done
        log.debug("consumer_closed", error=str(exc))
