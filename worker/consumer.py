"""Pub/Sub streaming pull on the event loop: flow control, leases, ack/nack, and an ordered stop.

The consumer speaks Pub/Sub's ``StreamingPull`` itself, over one ``grpc.aio``
channel, with the request and response messages google-cloud-pubsub defines.
It replaced that library's threaded subscriber, measured
(``python -m bench.pubsub_clients``, 3,000 messages, 64 held, on the emulator):
at the same rate (the emulator's, about 1,900 messages/s), the library's
subscriber handing messages to asyncio cost 0.16 ms of CPU per message (0.3 ms
when each callback thread stayed parked until its job was settled, which the
ordered shutdown needed), and this consumer 0.04 ms. Inside the worker those
threads also contended with the event loop for the GIL.

- **Flow control** is the consumer's own: at most ``max_messages`` messages and
  ``max_bytes`` bytes are handed to the pipeline at once. The stream asks the
  server for the same bounds, but the emulator ignores them, so messages beyond
  them wait here (leased) and the stream is not read until they are handed out.
- **Leases**: every message held (handed out or waiting) has its ack deadline
  pushed to ``LEASE_EXTENSION_S`` every ``LEASE_RENEW_S``, until it has been held
  ``max_lease_duration`` (the pipeline nacks a job before then).
- **Acks and nacks** are batched into unary ``Acknowledge`` / ``ModifyAckDeadline``
  calls, which answer (unlike acks written on the stream), so ``wait_closed``
  knows they were sent.
- **Nacks are paced.** A message the pipeline nacks while the worker runs keeps
  its lease and its flow-control slot for a backoff that doubles with its
  delivery attempt (``NACK_HOLD_BASE_S`` .. ``NACK_HOLD_MAX_S``) before it is
  handed back. Transient failures are mostly outages (storage or Triton down for
  seconds), and each redelivery spends one of the subscription's
  ``max_delivery_attempts``: handed back at once, a message burns its five
  attempts in the first seconds of a 10 s outage and is dead-lettered although
  nothing is wrong with it (the chaos scenario ``storage_outage`` showed it).
  Held slots also stop the pull, so an outage is backpressure, not churn. Once
  stopping, nacks go out at once: shutdown must not wait on a backoff.
- **The stream** is reopened with backoff when it breaks for a retryable reason
  (Pub/Sub closes streams from time to time); any other error stops the
  consumer, and readiness reports it. Stopping half-closes it and lets the
  server end it (``_end_stream``), rather than cancelling it.

The consumer never decides a message's fate; ``pipeline.py`` does, through
``Delivery.ack`` / ``Delivery.nack``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from google.protobuf import empty_pb2
from google.pubsub_v1.services.subscriber.transports.grpc_asyncio import SubscriberGrpcAsyncIOTransport
from google.pubsub_v1.types import (
    AcknowledgeRequest,
    ModifyAckDeadlineRequest,
    StreamingPullRequest,
    StreamingPullResponse,
)

from worker import telemetry

log = structlog.get_logger(__name__)

#: Seconds one lease lasts: the stream's ack deadline and each renewal's. What it
#: bounds is how long the messages of a worker that died (SIGKILL, OOM, node loss)
#: stay invisible: 10 s, the least Pub/Sub allows, brought them back in about 9 s.
LEASE_EXTENSION_S = 10
#: Seconds between lease renewals: well inside ``LEASE_EXTENSION_S``, so a renewal
#: that is late by a busy event loop or a slow round trip still lands in time.
LEASE_RENEW_S = 3.0
#: Seconds between heartbeats on an idle stream (Pub/Sub closes streams that stay silent).
HEARTBEAT_S = 30.0
#: Seconds the server gets to end the stream after the consumer stops writing, before it is cancelled.
STREAM_END_S = 2.0
#: Seconds acks and nacks are gathered before one request carries them all.
SETTLE_BATCH_S = 0.01
#: Ack ids per request: Pub/Sub's request size limit (512 KiB) holds about 2,500.
MAX_IDS_PER_REQUEST = 2500
#: Tries of one ack or modack request before its ids are given up (the messages come back, which
#: the pipeline's records make harmless).
SETTLE_ATTEMPTS = 3
#: Backoff of the stream's reconnections, in seconds: first and longest.
RECONNECT_BASE_S = 0.1
RECONNECT_MAX_S = 10.0
#: Stream errors that mean "open it again"; anything else (no such subscription, no permission) stops the consumer.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)

#: Seconds a nacked message is held before it is handed back, on its first
#: delivery; doubled on each later one. Attempts 1 to 4 wait 2, 4, 8 and 16 s,
#: so a message meets a fifth delivery (the default dead-letter threshold) only
#: after about 30 s of failures, not after one second.
NACK_HOLD_BASE_S = 2.0
#: The longest hold, in seconds: short enough that one slot held by a failing message costs little throughput.
NACK_HOLD_MAX_S = 30.0

_SERVICE = "/google.pubsub.v1.Subscriber/"
_PULL_REQUEST = StreamingPullRequest.pb()
_PULL_RESPONSE = StreamingPullResponse.pb()
_ACK_REQUEST = AcknowledgeRequest.pb()
_MODACK_REQUEST = ModifyAckDeadlineRequest.pb()
_EMULATOR_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
)
#: Pings every 30 s, as Google's own clients do, so a dead connection to Pub/Sub is noticed. Not
#: toward the emulator: it answers them after 90 s with GOAWAY ("too_many_pings"), and every
#: stream closed that way stays on its books and keeps taking a share of the redeliveries
#: (``chaos/scenarios.py: orphan_allowance_s``).
_CHANNEL_OPTIONS = (*_EMULATOR_CHANNEL_OPTIONS, ("grpc.keepalive_time_ms", 30_000))


def nack_hold_s(delivery_attempt: int | None) -> float:
    """How long a message nacked on this delivery attempt is held before it is handed back."""
    attempt = max(1, delivery_attempt or 1)
    return float(min(NACK_HOLD_MAX_S, NACK_HOLD_BASE_S * 2 ** (attempt - 1)))


@dataclass(eq=False)
class Delivery:
    """One received message, until the pipeline acks or nacks it."""

    message_id: str
    data: bytes
    attributes: Mapping[str, str]
    publish_time: float  # seconds since the epoch
    delivery_attempt: int | None
    ack_id: str = ""
    received_at: float = field(default_factory=time.monotonic)
    #: Called once, with ``True`` for an ack and ``False`` for a nack: the consumer's bookkeeping.
    _settle: Callable[[Delivery, bool], None] | None = field(default=None, repr=False)
    _settled: bool = field(default=False, repr=False)
    _nacked: bool = field(default=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def nacked(self) -> bool:
        """Settled by ``nack``: the consumer hands the message back (after its hold)."""
        return self._nacked

    def ack(self) -> None:
        if not self._settled:
            self._settled = True
            if self._settle is not None:
                self._settle(self, True)

    def nack(self) -> None:
        """Give the message back for redelivery."""
        if not self._settled:
            self._settled = True
            self._nacked = True
            if self._settle is not None:
                self._settle(self, False)


def open_channel() -> grpc.aio.Channel:
    """A channel to ``PUBSUB_EMULATOR_HOST`` (plain text), else to Pub/Sub with the default credentials."""
    emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
    if emulator:
        return grpc.aio.insecure_channel(emulator, options=_EMULATOR_CHANNEL_OPTIONS)
    return SubscriberGrpcAsyncIOTransport.create_channel(options=_CHANNEL_OPTIONS)


class Consumer:
    """Streaming pull of one subscription into ``queue``; ``start()`` once, ``stop_pulling()`` to stop.

    ``async with`` starts it and, on leaving, stops it and sends the last acks (``wait_closed``); the
    worker instead calls the steps itself, in its ordered shutdown.

    Everything runs on the event loop that called ``start``.
    """

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
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._max_lease_duration_s = max_lease_duration_s
        self._channel: grpc.aio.Channel | None = None
        self._leaser: asyncio.Task[None] | None = None
        self._puller: asyncio.Task[None] | None = None
        #: The stream now open, for ``_end_stream``.
        self._call: Any = None
        self._ender: asyncio.Task[None] | None = None
        #: Handed to the pipeline and not yet settled (or nacked and held for its backoff).
        self._out: set[Delivery] = set()
        self._out_bytes = 0
        #: Received beyond the flow-control bounds: leased, waiting for room.
        self._waiting: deque[Delivery] = deque()
        self._room = asyncio.Event()
        self._holds: dict[Delivery, asyncio.TimerHandle] = {}
        self._acks: list[str] = []
        self._nacks: list[str] = []
        self._flush_wanted = asyncio.Event()
        self._settler: asyncio.Task[None] | None = None
        self._stopping = False
        self._closing = False
        self.running = False

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._channel is not None:
            raise RuntimeError("Consumer already started")
        self._channel = open_channel()
        self._ack_call = self._channel.unary_unary(
            _SERVICE + "Acknowledge",
            request_serializer=_ACK_REQUEST.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )
        self._modack_call = self._channel.unary_unary(
            _SERVICE + "ModifyAckDeadline",
            request_serializer=_MODACK_REQUEST.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )
        self._room.set()
        self.running = True
        self._puller = asyncio.create_task(self._pull_forever(), name="pubsub-pull")
        self._leaser = asyncio.create_task(self._renew_leases(), name="pubsub-leases")
        self._settler = asyncio.create_task(self._send_settlements(), name="pubsub-settle")
        log.info("consumer_started", subscription=self._subscription)

    async def __aenter__(self) -> Consumer:
        self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.wait_closed()

    def stop_pulling(self) -> None:
        """Stop receiving; what was handed out stays held until the pipeline settles it."""
        self._stopping = True
        self.running = False
        if self._ender is None and self._puller is not None and not self._puller.done():
            self._ender = asyncio.create_task(self._end_stream(self._puller), name="pubsub-end-stream")
        # Never handed out: straight back to Pub/Sub.
        while self._waiting:
            self._give_back(self._waiting.popleft())
        # Nacks held for their backoff go out now.
        for delivery, handle in list(self._holds.items()):
            handle.cancel()
            self._release_nack(delivery)
        self._room.set()

    def nack_held(self) -> int:
        """Nack every message still held (the end of the grace period); returns how many."""
        held = [d for d in self._out if not d.settled]
        for delivery in held:
            delivery.nack()
        return len(held)

    async def wait_closed(self) -> None:
        """Send the last acks and nacks and close the channel; idempotent."""
        if self._channel is None:
            return
        self.stop_pulling()
        if self._ender is not None:
            await self._ender
        for task in (self._puller, self._leaser):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # The settler sends what is pending and returns: cancelling it could drop a request half sent.
        self._closing = True
        self._flush_wanted.set()
        if self._settler is not None:
            await self._settler
        channel, self._channel = self._channel, None
        await channel.close()

    # -- what the worker reads --------------------------------------------------------------------

    @property
    def held(self) -> int:
        return len(self._out) + len(self._waiting)

    def oldest_age_s(self) -> float:
        """Age since publish of the oldest message held, 0 when none."""
        oldest = min((d.publish_time for d in (*self._out, *self._waiting)), default=None)
        return max(0.0, time.time() - oldest) if oldest is not None else 0.0

    # -- the stream -----------------------------------------------------------------------------------

    async def _pull_forever(self) -> None:
        delay = RECONNECT_BASE_S
        while not self._stopping:
            try:
                received = await self._pull_once()
            except grpc.aio.AioRpcError as exc:
                if self._stopping:
                    return
                if exc.code() not in RETRYABLE:
                    self.running = False
                    log.error("consumer_stopped", code=exc.code().name, error=exc.details())
                    return
                log.warning("pubsub_stream_reopened", code=exc.code().name, error=exc.details(), delay_s=delay)
                received = 0
            if self._stopping:
                return
            if received:
                delay = RECONNECT_BASE_S
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _pull_once(self) -> int:
        """One stream, read until it ends or breaks; returns the messages it brought."""
        assert self._channel is not None
        call = self._channel.stream_stream(
            _SERVICE + "StreamingPull",
            request_serializer=_PULL_REQUEST.SerializeToString,
            response_deserializer=_PULL_RESPONSE.FromString,
        )()
        received = 0
        heartbeat = None
        try:
            await call.write(
                _PULL_REQUEST(
                    subscription=self._subscription,
                    stream_ack_deadline_seconds=LEASE_EXTENSION_S,
                    max_outstanding_messages=self._max_messages,
                    max_outstanding_bytes=self._max_bytes,
                )
            )
            heartbeat = asyncio.create_task(self._heartbeat(call), name="pubsub-heartbeat")
            self._call = call
            while True:
                await self._room.wait()
                response: Any = await call.read()
                if response is grpc.aio.EOF:
                    return received
                received += self._receive(response.received_messages)
        finally:
            self._call = None
            if heartbeat is not None:
                heartbeat.cancel()
            call.cancel()

    async def _end_stream(self, puller: asyncio.Task[None]) -> None:
        """Stop writing and let the server end the stream; cancel it if the server does not within ``STREAM_END_S``.

        Half-closing is the orderly end of a streaming call. It matters on the
        emulator: a stream the client cancels stays on its books (its gRPC layer
        throws in ``onRstStreamRead``) and takes the nacks a stopping worker
        sends, each then waiting out a 10 s deadline there before another
        worker sees it. Measured: a nack sent after a cancel was gone from a
        plain pull 50 ms later in 12 of 12 tries; after a half-close it was
        still there 50 ms, 0.5 s and 2 s later in 8 of 8. Messages the server
        sends before it ends the stream go straight back (``_receive`` while
        stopping).
        """
        call = self._call
        if call is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                await call.done_writing()
        try:
            await asyncio.wait_for(asyncio.shield(puller), STREAM_END_S)
        except TimeoutError:
            puller.cancel()

    async def _heartbeat(self, call: Any) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if self._stopping:
                return  # the stream is being half-closed: no write may follow
            await call.write(_PULL_REQUEST())

    def _receive(self, messages: Sequence[Any]) -> int:
        now = time.monotonic()
        for received in messages:
            message = received.message
            stamp = message.publish_time
            delivery = Delivery(
                message_id=message.message_id,
                data=message.data,
                attributes=dict(message.attributes),
                publish_time=stamp.seconds + stamp.nanos / 1e9,
                delivery_attempt=received.delivery_attempt or None,
                ack_id=received.ack_id,
                received_at=now,
                _settle=self._settled,
            )
            if self._stopping:
                self._give_back(delivery)
            else:
                self._waiting.append(delivery)
        self._hand_out()
        return len(messages)

    # -- flow control ------------------------------------------------------------------------------

    def _hand_out(self) -> None:
        while self._waiting and not self._stopping and self._has_room(self._waiting[0]):
            delivery = self._waiting.popleft()
            self._out.add(delivery)
            self._out_bytes += delivery.size
            self._queue.put_nowait(delivery)
        # While messages wait for room, the stream is not read: gRPC's flow control then stops the
        # server from pushing more, and what it has not pushed stays available to other streams.
        # Reading on (leasing everything the emulator pushes, as it ignores the bounds) was tried:
        # it ended the backlog chaos run's dead-lettered copies (3,751 to 0), but a SIGKILLed
        # worker then took the whole backlog down with it, and the emulator handed the expired
        # messages to no stream already open: the restarted worker sat idle for 90 s.
        if self._waiting:
            self._room.clear()
        else:
            self._room.set()
        telemetry.MESSAGES_HELD.set(self.held)

    def _has_room(self, delivery: Delivery) -> bool:
        if not self._out:
            return True  # one message always fits, however large
        return len(self._out) < self._max_messages and self._out_bytes + delivery.size <= self._max_bytes

    def _settled(self, delivery: Delivery, acked: bool) -> None:
        if acked:
            self._acks.append(delivery.ack_id)
            self._flush_wanted.set()
            self._done(delivery)
        elif self._stopping:
            self._release_nack(delivery)
        else:
            # Hold the lease and the flow-control slot for the backoff; stop_pulling cuts it short.
            hold = nack_hold_s(delivery.delivery_attempt)
            self._holds[delivery] = asyncio.get_running_loop().call_later(hold, self._release_nack, delivery)

    def _release_nack(self, delivery: Delivery) -> None:
        self._holds.pop(delivery, None)
        self._give_back(delivery)
        self._done(delivery)

    def _give_back(self, delivery: Delivery) -> None:
        self._nacks.append(delivery.ack_id)
        self._flush_wanted.set()

    def _done(self, delivery: Delivery) -> None:
        if delivery in self._out:
            self._out.discard(delivery)
            self._out_bytes -= delivery.size
        self._hand_out()

    # -- requests beside the stream ---------------------------------------------------------------

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            now = time.monotonic()
            # Handed out, waiting, or nacked and held for its backoff: every message here is ours.
            held = (*self._out, *self._waiting)
            ids = [d.ack_id for d in held if now - d.received_at < self._max_lease_duration_s]
            await self._modack(ids, LEASE_EXTENSION_S)

    async def _send_settlements(self) -> None:
        """Send acks and nacks as they come, until ``wait_closed`` has had the last ones sent."""
        while not (self._closing and not self._acks and not self._nacks):
            await self._flush_wanted.wait()
            if not self._closing:
                # Let the acks of one batch of results gather into one request.
                await asyncio.sleep(SETTLE_BATCH_S)
            await self._flush()

    async def _flush(self) -> None:
        self._flush_wanted.clear()
        acks, self._acks = self._acks, []
        nacks, self._nacks = self._nacks, []
        for start in range(0, len(acks), MAX_IDS_PER_REQUEST):
            request = _ACK_REQUEST(subscription=self._subscription, ack_ids=acks[start : start + MAX_IDS_PER_REQUEST])
            await self._send("ack", self._ack_call, request)
        await self._modack(nacks, 0)

    async def _modack(self, ids: list[str], seconds: int) -> None:
        for start in range(0, len(ids), MAX_IDS_PER_REQUEST):
            request = _MODACK_REQUEST(
                subscription=self._subscription,
                ack_ids=ids[start : start + MAX_IDS_PER_REQUEST],
                ack_deadline_seconds=seconds,
            )
            await self._send("nack" if seconds == 0 else "lease", self._modack_call, request)

    async def _send(self, what: str, call: Any, request: Any) -> None:
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                await call(request)
                return
            except grpc.aio.AioRpcError as exc:
                telemetry.PUBSUB_REQUEST_ERRORS.labels(what).inc()
                if attempt == SETTLE_ATTEMPTS or exc.code() not in RETRYABLE:
                    # The messages come back after their deadline; their records make the repeat harmless.
                    log.warning("pubsub_request_failed", request=what, code=exc.code().name, error=exc.details())
                    return
                await asyncio.sleep(RECONNECT_BASE_S * 2 ** (attempt - 1))
