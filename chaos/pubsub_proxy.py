"""A gRPC proxy in front of the Pub/Sub emulator that plays the faults of the real service the emulator never shows.

Real Pub/Sub ends every streaming pull from time to time with UNAVAILABLE,
answers PERMISSION_DENIED for minutes while an IAM grant propagates, NOT_FOUND
once a subscription is deleted, and can be slow or fail to answer an ack or a
modack. The emulator does none of it. The proxy forwards every Publisher and
Subscriber call to the emulator, as bytes (nothing is decoded), and injects,
as ``PubsubFaults`` says:

1. ``close_streams_every_s``: each ``StreamingPull`` ends with UNAVAILABLE
   after this long. The proxy half-closes its side toward the emulator and
   passes on what the emulator still sends until it ends the stream, so no
   message is swallowed; a cancelled stream would stay on the emulator's books
   and take a share of its redeliveries (``chaos/scenarios.py:
   orphan_allowance_s``), which is the emulator's flaw, not the fault played.
2. ``deny_for_s``: every Subscriber call answers PERMISSION_DENIED for this
   long after ``start()``, then passes through.
3. ``not_found``: every Subscriber call answers NOT_FOUND, forever.
4. ``delay_settle_s``: ``Acknowledge`` and ``ModifyAckDeadline`` are held this
   long before they are forwarded.
5. ``drop_ack_share``: this share of ``Acknowledge`` calls answer UNAVAILABLE
   without being forwarded.

Like ``chaos/proxy.py`` it runs its own event loop on a thread, so synchronous
and asynchronous callers drive it alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

T = TypeVar("T")
Context = grpc.aio.ServicerContext[bytes, bytes]

_PUBLISHER = "/google.pubsub.v1.Publisher/"
_SUBSCRIBER = "/google.pubsub.v1.Subscriber/"
_STREAMING_PULL = _SUBSCRIBER + "StreamingPull"
_SETTLE = frozenset({_SUBSCRIBER + "Acknowledge", _SUBSCRIBER + "ModifyAckDeadline"})
_CHANNEL_OPTIONS = (("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1))
#: Seconds the emulator gets to end a stream the proxy half-closed, before the proxy cancels it.
STREAM_END_S = 2.0
#: Seconds a control call (start, stop) may take on the proxy's loop.
CONTROL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class PubsubFaults:
    """What the proxy does to the calls it forwards; the default forwards everything untouched."""

    close_streams_every_s: float | None = None
    deny_for_s: float = 0.0
    not_found: bool = False
    delay_settle_s: float = 0.0
    drop_ack_share: float = 0.0


class PubsubProxy:
    """Forwards ``127.0.0.1:<port>`` to the emulator at ``upstream`` (``host:port``); ``start()``, then ``stop()``."""

    def __init__(self, upstream: str, faults: PubsubFaults, seed: int = 0) -> None:
        self.upstream = upstream
        self.faults = faults
        self.port = 0
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pubsub-proxy", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._started_at = 0.0
        #: What the proxy did, by fault: streams opened and closed, calls refused, delayed, dropped.
        self.counts: dict[str, int] = {
            "calls": 0,
            "streams": 0,
            "streams_closed": 0,
            "denied": 0,
            "not_found": 0,
            "delayed": 0,
            "acks_dropped": 0,
        }

    @property
    def host(self) -> str:
        """What ``PUBSUB_EMULATOR_HOST`` is set to for a client that should go through the proxy."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if self._thread.is_alive():
            raise RuntimeError("PubsubProxy already started")
        self._thread.start()
        self._call(self._start())

    def stop(self) -> None:
        """Close the server and the upstream channel and end the loop's thread; idempotent."""
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_S)
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT_S)

    async def _start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.upstream, options=_CHANNEL_OPTIONS)
        server = grpc.aio.server(options=_CHANNEL_OPTIONS)
        server.add_generic_rpc_handlers((_Handlers(self),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        self._started_at = time.monotonic()

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
        if self._channel is not None:
            await self._channel.close()

    # -- the faults ----------------------------------------------------------------------------------

    async def _refuse(self, method: str, context: Context) -> None:
        """Abort the call with the status the faults give a Subscriber call now, if any."""
        if not method.startswith(_SUBSCRIBER):
            return
        if self.faults.not_found:
            self.counts["not_found"] += 1
            await context.abort(grpc.StatusCode.NOT_FOUND, "Resource not found (resource=subscription).")
        if time.monotonic() - self._started_at < self.faults.deny_for_s:
            self.counts["denied"] += 1
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "User not authorized to perform this action (fault proxy)."
            )

    async def unary(self, method: str, request: bytes, context: Context) -> bytes:
        self.counts["calls"] += 1
        await self._refuse(method, context)
        if method in _SETTLE and self.faults.delay_settle_s > 0:
            self.counts["delayed"] += 1
            await asyncio.sleep(self.faults.delay_settle_s)  # the fault itself: a slow answer
        if method == _SUBSCRIBER + "Acknowledge" and self._rng.random() < self.faults.drop_ack_share:
            self.counts["acks_dropped"] += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "The service was unable to fulfill your request.")
        assert self._channel is not None
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(method)
        try:
            response: bytes = await call(request, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        return response

    async def streaming_pull(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        self.counts["calls"] += 1
        self.counts["streams"] += 1
        await self._refuse(_STREAMING_PULL, context)
        assert self._channel is not None
        upward: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def feed() -> AsyncIterator[bytes]:
            while (item := await upward.get()) is not None:
                yield item

        async def pump() -> None:
            try:
                async for request in requests:
                    upward.put_nowait(request)
            finally:
                upward.put_nowait(None)

        open_stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = self._channel.stream_stream(_STREAMING_PULL)
        upstream = open_stream(feed())
        loop = asyncio.get_running_loop()
        pumping = asyncio.create_task(pump())
        timers: list[asyncio.TimerHandle] = []
        closing = False

        def close() -> None:
            # Half-close toward the emulator and let it end the stream; cancel it if it does not.
            nonlocal closing
            closing = True
            upward.put_nowait(None)
            timers.append(loop.call_later(STREAM_END_S, upstream.cancel))

        if self.faults.close_streams_every_s is not None:
            timers.append(loop.call_later(self.faults.close_streams_every_s, close))
        try:
            async for response in upstream:
                yield response
        except grpc.aio.AioRpcError as exc:
            if not closing:
                await context.abort(exc.code(), exc.details() or "")
        finally:
            for timer in timers:
                timer.cancel()
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping
            upstream.cancel()
        if closing:
            self.counts["streams_closed"] += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "The service was unable to fulfill your request.")


class _Handlers(grpc.GenericRpcHandler):
    """Every Publisher and Subscriber method, forwarded as bytes."""

    def __init__(self, proxy: PubsubProxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method: str = handler_call_details.method
        if method == _STREAMING_PULL:
            return grpc.stream_stream_rpc_method_handler(self._proxy.streaming_pull)
        if method.startswith((_PUBLISHER, _SUBSCRIBER)):
            proxy = self._proxy

            async def unary(request: bytes, context: Context) -> bytes:
                return await proxy.unary(method, request, context)

            return grpc.unary_unary_rpc_method_handler(unary)
        return None
