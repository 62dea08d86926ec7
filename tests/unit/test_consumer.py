"""The consumer's stream handling against an in-process gRPC server that breaks streams on purpose.

The Pub/Sub emulator never closes a stream on its own, and real Pub/Sub does
(``UNAVAILABLE`` every so often): this server speaks the three Subscriber
methods the consumer uses, with Pub/Sub's own message types, and ends the
first stream with ``UNAVAILABLE`` after one message. Everything else about the
consumer runs against the real emulator in ``tests/integration/test_consumer.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from google.pubsub_v1.types import (
    AcknowledgeRequest,
    ModifyAckDeadlineRequest,
    StreamingPullRequest,
    StreamingPullResponse,
)

from worker.consumer import Consumer, Delivery

PULL_REQUEST = StreamingPullRequest.pb()
PULL_RESPONSE = StreamingPullResponse.pb()
ACK_REQUEST = AcknowledgeRequest.pb()
MODACK_REQUEST = ModifyAckDeadlineRequest.pb()
WAIT_S = 10.0


class BreakingSubscriber:
    """Sends ``m1`` on the first stream and ends it with ``UNAVAILABLE``; ``m2`` on the next, then holds it open."""

    def __init__(self, first_error: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.first_error = first_error
        self.streams = 0
        self.acked: list[str] = []
        self.modacked: list[tuple[str, int]] = []

    async def streaming_pull(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        self.streams += 1
        number = self.streams
        first = await requests.__anext__()
        assert first.subscription == "projects/p/subscriptions/s"
        yield PULL_RESPONSE(
            received_messages=[
                {"ack_id": f"a{number}", "message": {"message_id": f"m{number}", "data": f"job {number}".encode()}}
            ]
        )
        if number == 1:
            await context.abort(self.first_error, "stream closed by the server")
        async for _ in requests:  # heartbeats, until the client goes away
            pass

    async def acknowledge(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> empty_pb2.Empty:
        self.acked.extend(request.ack_ids)
        return empty_pb2.Empty()

    async def modify_ack_deadline(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> empty_pb2.Empty:
        self.modacked.extend((ack_id, request.ack_deadline_seconds) for ack_id in request.ack_ids)
        return empty_pb2.Empty()


@pytest.fixture
async def subscriber(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[BreakingSubscriber]:
    fake = BreakingSubscriber(getattr(request, "param", grpc.StatusCode.UNAVAILABLE))
    handlers = {
        "StreamingPull": grpc.stream_stream_rpc_method_handler(
            fake.streaming_pull,
            request_deserializer=PULL_REQUEST.FromString,
            response_serializer=PULL_RESPONSE.SerializeToString,
        ),
        "Acknowledge": grpc.unary_unary_rpc_method_handler(
            fake.acknowledge,
            request_deserializer=ACK_REQUEST.FromString,
            response_serializer=empty_pb2.Empty.SerializeToString,
        ),
        "ModifyAckDeadline": grpc.unary_unary_rpc_method_handler(
            fake.modify_ack_deadline,
            request_deserializer=MODACK_REQUEST.FromString,
            response_serializer=empty_pb2.Empty.SerializeToString,
        ),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("google.pubsub.v1.Subscriber", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{port}")
    try:
        yield fake
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def pulling() -> AsyncIterator[tuple[Consumer, asyncio.Queue[Delivery]]]:
    """A started consumer of the fake's subscription and its queue; closed (acks sent) when the block ends."""
    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    consumer = Consumer("projects/p/subscriptions/s", queue, max_messages=5, max_bytes=10**6, max_lease_duration_s=600)
    async with consumer:
        yield consumer, queue


async def test_a_stream_closed_by_the_server_is_reopened(subscriber: BreakingSubscriber) -> None:
    async with pulling() as (consumer, queue):
        first = await asyncio.wait_for(queue.get(), WAIT_S)
        second = await asyncio.wait_for(queue.get(), WAIT_S)
        assert (first.message_id, second.message_id) == ("m1", "m2")
        assert subscriber.streams == 2
        assert consumer.running
        # A message from the broken stream is still ours to ack: its ack id outlives the stream.
        first.ack()
        second.nack()
    assert subscriber.acked == ["a1"]
    assert ("a2", 0) in subscriber.modacked  # the nack: held for its backoff, cut short by the close


@pytest.mark.parametrize("subscriber", [grpc.StatusCode.PERMISSION_DENIED], indirect=True)
async def test_an_error_that_retrying_cannot_mend_stops_the_consumer(subscriber: BreakingSubscriber) -> None:
    async with pulling() as (consumer, queue):
        delivery = await asyncio.wait_for(queue.get(), WAIT_S)
        assert consumer._puller is not None
        await asyncio.wait_for(asyncio.shield(consumer._puller), WAIT_S)  # the pull loop has ended
        assert not consumer.running
        assert subscriber.streams == 1
        delivery.ack()
    assert subscriber.acked == ["a1"]
