"""Pub/Sub streaming pull bridged into asyncio: flow control, leases, ack/nack, and an ordered stop.

google-cloud-pubsub runs a streaming pull with flow control (``max_messages``,
``max_bytes``) and extends the lease of every message it holds, up to
``max_lease_duration``. Its callbacks run on its own threads; each one hands a
``Delivery`` to the asyncio side through a bounded queue and then *waits until
the pipeline settles it* (ack or nack). Holding the callback is what makes the
shutdown ordered: stopping the pull future stops pulling at once, waits for
held callbacks (our in-flight jobs), nacks what was never handed out, and
flushes acks and nacks before the client closes.

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

    def ack(self) -> None:
        if not self._settled.is_set():
            self._message.ack()
            self._settled.set()

    def nack(self) -> None:
        if not self._settled.is_set():
            self._message.nack()
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
        )
        # One thread per message held: each callback waits for its message to be settled.
        self._executor = ThreadPoolExecutor(max_workers=max_messages + 2, thread_name_prefix="pubsub-callback")
        self._client: pubsub_v1.SubscriberClient | None = None
        self._future: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: dict[str, Delivery] = {}
        self._lock = threading.Lock()
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
            self._held[delivery.message_id] = delivery
            telemetry.MESSAGES_HELD.set(len(self._held))
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delivery)
        except RuntimeError:
            delivery.nack()  # the event loop is gone: let Pub/Sub redeliver
        delivery.wait_settled()
        with self._lock:
            self._held.pop(delivery.message_id, None)
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
