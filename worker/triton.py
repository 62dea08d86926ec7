"""``TritonStream``: inference requests to Triton over one gRPC channel, many in flight at once.

Two modes, one interface. ``stream`` (the default) keeps long-lived
``ModelStreamInfer`` calls ("lanes", below); ``unary`` sends one ``ModelInfer``
call per request; both multiplex everything on the channel's one HTTP/2
connection. Either way Triton's dynamic batcher sees a steady flow of single
requests and forms the batches, and every request has a deadline. A unary call
hands grpc's core its sends and receives as one batch of operations; a stream
crosses into the core and back for every write and every read. So streams give
the throughput (the default), and ``unary`` costs a worker short of CPU less
(the README's Performance section has the figures).

Why not ``tritonclient.grpc.aio``'s helpers: its ``stream_infer`` turns an
error response into an exception without the request id, so a failed request
could not be told apart from the others in flight. This module speaks the
same protocol over ``grpc.aio`` directly (the messages are ``worker.wire``'s).
The control plane (readiness, model configs, loading) uses tritonclient's aio
client as is.

In stream mode, when a stream breaks (Triton restarted, connection reset),
every request written to it fails with ``TransientError`` (the pipeline
retries them), requests not yet written wait in the queue, and the stream is
reopened with exponential backoff. A stream that stops answering while
requests are pending is torn down and reopened rather than left to hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import grpc
import structlog
from numpy.typing import NDArray
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from worker import telemetry
from worker.errors import TransientError
from worker.models import ModelSpec
from worker.shm import Region, ShmPool
from worker.wire import (
    InferResult,
    ShmRefused,
    attach_regions,
    build_request,
    read_response,
    response_error,
    status_error,
)

log = structlog.get_logger(__name__)

#: Images travel inside gRPC messages; gRPC's 4 MiB default is far too small
#: for a 4x upscale (a 1024 px input comes back as 48 MiB).
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
#: Seconds one inference request may take (a job's own deadline shortens it): past it the request is
#: dropped from Triton's queue and the job retried, and a stream with no answer for this long is stalled.
INFER_TIMEOUT_S = 60.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
#: Reconnect backoff bounds in seconds: quick first retry, capped so a
#: restarted Triton is picked up within a few seconds of becoming ready.
RECONNECT_BASE_S = 0.1
RECONNECT_MAX_S = 5.0


class StreamBroken(TransientError):
    """The stream closed while this request was in flight; retry it."""


def _count_transport(model: str, regions: list[Region] | None) -> None:
    """Which way an answered request's tensors travelled: any region means shared memory."""
    transport = "shared_memory" if regions else "message"
    telemetry.TRITON_REQUESTS.labels(transport=transport).inc()


LaneKey = tuple[str, int]  # (model, priority)


class _Lane:
    """One long-lived ``ModelStreamInfer`` call: a bounded queue feeds its writer, one reader settles futures."""

    def __init__(self, key: LaneKey, stub: Any, *, queue_size: int, stall_s: float) -> None:
        self.key = key
        self._stub = stub
        self._stall_s = stall_s
        self._queue: asyncio.Queue[service_pb2.ModelInferRequest] = asyncio.Queue(maxsize=queue_size)
        self.pending: dict[str, asyncio.Future[InferResult]] = {}
        self._call: Any = None
        self._last_response = 0.0
        self._responded = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("lane already started")
        self._task = asyncio.create_task(self._run(), name=f"triton-lane-{self.key[0]}-{self.key[1]}")

    async def send(self, request: service_pb2.ModelInferRequest, timeout_s: float) -> InferResult:
        future: asyncio.Future[InferResult] = asyncio.get_running_loop().create_future()
        self.pending[request.id] = future
        try:
            # One deadline for queueing and answer. ``asyncio.timeout``, not ``wait_for``: in Python 3.11
            # each ``wait_for`` wraps its awaitable in a task of its own, a second task per request.
            async with asyncio.timeout(timeout_s):
                await self._queue.put(request)
                return await future
        except TimeoutError:
            self._on_timeout()
            raise
        finally:
            self.pending.pop(request.id, None)

    async def stop(self) -> None:
        """Close the stream; requests still pending fail with ``TransientError``. Idempotent."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_pending(lambda: TransientError("triton stream stopped"))

    def _on_timeout(self) -> None:
        # Responses stopped arriving although requests wait: the stream is stuck, not slow.
        loop = asyncio.get_running_loop()
        if self._call is not None and loop.time() - self._last_response > self._stall_s:
            log.warning("triton_stream_stalled", model=self.key[0], pending=len(self.pending))
            self._call.cancel()

    def _fail_pending(self, error: Callable[[], Exception]) -> None:
        # A new exception per request: one instance raised in many tasks would gather all their tracebacks.
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error())

    async def _run(self) -> None:
        failures = 0
        while True:
            call = self._stub.ModelStreamInfer()
            self._call = call
            self._responded = False
            self._last_response = asyncio.get_running_loop().time()
            writer = asyncio.create_task(self._write(call), name="triton-lane-writer")
            try:
                await call.wait_for_connection()
                await self._read(call)
                reason = "stream closed by server"
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the lane is being stopped
                # The call was cancelled under the reader, not the lane: a stall was detected.
                reason = "stream stalled"
            except Exception as exc:
                # A bug here must not leave the lane dead with requests waiting out their deadlines.
                log.exception("triton_lane_crashed", model=self.key[0])
                reason = repr(exc)
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await writer
                call.cancel()
                self._call = None
            # A stream that carried responses was healthy: start the backoff afresh.
            failures = 0 if self._responded else failures + 1
            self._fail_pending(partial(StreamBroken, f"triton stream broke: {reason}"))
            telemetry.TRITON_RECONNECTS.inc()
            delay = min(RECONNECT_MAX_S, RECONNECT_BASE_S * 2**failures) * random.uniform(0.5, 1.0)
            log.warning("triton_stream_reconnecting", model=self.key[0], reason=reason, delay_s=round(delay, 3))
            await asyncio.sleep(delay)

    async def _write(self, call: Any) -> None:
        while True:
            request = await self._queue.get()
            if request.id not in self.pending:
                continue  # its caller timed out or was cancelled while it queued
            try:
                await call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # The stream is gone: end it, so the reader sees it and the lane reconnects.
                call.cancel()
                raise

    async def _read(self, call: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            self._responded = True
            self._last_response = loop.time()
            infer = response.infer_response
            future = self.pending.get(infer.id)
            if future is None or future.done():
                continue
            if response.error_message:
                future.set_exception(response_error(response.error_message))
                continue
            try:
                future.set_result(read_response(infer))
            except (ValueError, KeyError) as exc:
                # A response we cannot decode fails its own request, not the whole lane.
                future.set_exception(exc)


class TritonStream:
    """Inference requests to Triton. ``start()`` once, ``infer()`` from any number of tasks, ``stop()``.

    In stream mode, Triton answers the requests of one stream in the order they arrived (for
    models that are not decoupled), so a single stream for everything would
    make a 50 ms enhance wait behind a 3 s upscale, and a high-priority job
    behind the backlog it overtook in the queue. Each (model, priority) pair
    therefore gets its own *lane*: one long-lived stream opened on first use,
    all lanes multiplexed over one HTTP/2 connection. Within a lane the
    requests are alike and batched together, so in-order delivery costs
    nothing. ``mode="unary"`` sends one ``ModelInfer`` call per request
    instead, which has no such ordering at all.
    """

    def __init__(
        self,
        url: str,
        *,
        request_timeout_s: float = INFER_TIMEOUT_S,
        queue_size: int = 256,
        mode: str = "stream",
        shm_pool: ShmPool | None = None,
    ) -> None:
        if mode not in ("stream", "unary"):
            raise ValueError(f"mode must be stream or unary, not {mode!r}")
        self._url = url
        self._request_timeout_s = request_timeout_s
        self._queue_size = queue_size
        self._mode = mode
        self._ids = itertools.count()
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._lanes: dict[LaneKey, _Lane] = {}
        self._unary_in_flight = 0
        self.shm_pool = shm_pool

    async def start(self) -> None:
        if self._channel is not None:
            raise RuntimeError("TritonStream already started")
        self._channel = grpc.aio.insecure_channel(self._url, options=CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def stop(self) -> None:
        """Close every lane; requests still pending fail with ``TransientError``."""
        lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            await lane.stop()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    @property
    def lanes(self) -> int:
        """Streams opened so far (stream mode; always 0 in unary mode)."""
        return len(self._lanes)

    @property
    def in_flight(self) -> int:
        return self._unary_in_flight + sum(len(lane.pending) for lane in self._lanes.values())

    async def infer(
        self,
        model: str,
        version: str,
        inputs: Sequence[tuple[str, str, NDArray[Any]]],
        *,
        parameters: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        shm_output: tuple[str, int] | None = None,
    ) -> InferResult:
        """Run one request: ``inputs`` are ``(name, wire_dtype, array)`` with the batch dimension included.

        With a shared-memory pool, fixed-size inputs travel through regions, and so does the output
        named in ``shm_output`` (``(name, bytes it needs)``). Whatever does not fit the pool travels in
        the message; a request Triton refuses for a region is sent again without regions.
        """
        if self._stub is None:
            raise RuntimeError("TritonStream not started")
        limit_s = timeout_s if timeout_s is not None else self._request_timeout_s
        options: dict[str, Any] = {"parameters": parameters, "limit_s": limit_s, "priority": priority}
        options.update(model=model, version=version, inputs=inputs, pool=self.shm_pool)
        if self.shm_pool is not None:
            regions: list[Region] = []
            try:
                request = await build_request(f"r{next(self._ids)}", shm_output=shm_output, regions=regions, **options)
                result = await self._send(request, model, priority, limit_s)
                _count_transport(model, regions)
            except ShmRefused as exc:
                log.warning("shm_refused", model=model, error=str(exc))
                self.shm_pool.forget_registrations()
                for region in regions:
                    self.shm_pool.release(region)
            except BaseException:
                for region in regions:
                    self.shm_pool.release(region)
                raise
            else:
                return attach_regions(result, request, regions, self.shm_pool)
        # Without regions (no pool, or a refused region), every tensor travels in the message.
        request = await build_request(f"r{next(self._ids)}", shm_output=None, regions=None, **options)
        result = await self._send(request, model, priority, limit_s)
        _count_transport(model, None)
        return result

    async def _send(
        self, request: service_pb2.ModelInferRequest, model: str, priority: int, limit_s: float
    ) -> InferResult:
        try:
            if self._mode == "unary":
                return await self._unary(request, limit_s)
            return await self._lane((model, priority)).send(request, limit_s)
        except TimeoutError as exc:
            raise TransientError(f"triton request to {model} timed out after {limit_s:.1f} s") from exc

    def _lane(self, key: LaneKey) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(
                key, self._stub, queue_size=self._queue_size, stall_s=self._request_timeout_s
            )
            lane.start()
        return lane

    async def _unary(self, request: service_pb2.ModelInferRequest, timeout_s: float) -> InferResult:
        self._unary_in_flight += 1
        try:
            response = await self._stub.ModelInfer(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise status_error(exc.code(), exc.details() or exc.code().name) from exc
        finally:
            self._unary_in_flight -= 1
        return read_response(response)


class TritonControl:
    """The control plane: server and model readiness, model configs, loading versions."""

    def __init__(self, url: str) -> None:
        self._client = InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def server_ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready())
        except InferenceServerException:
            return False

    async def model_ready(self, model: str, version: str = "") -> bool:
        try:
            return bool(await self._client.is_model_ready(model, version))
        except InferenceServerException:
            return False

    async def repository_index(self) -> list[dict[str, Any]]:
        """Every model version of the repository with its state (READY, LOADING, UNAVAILABLE)."""
        try:
            index = await self._client.get_model_repository_index(as_json=True)
        except InferenceServerException as exc:
            raise TransientError(f"triton: cannot list models: {exc.message()}") from exc
        models: list[dict[str, Any]] = index.get("models", [])
        return models

    async def model_spec(self, model: str) -> ModelSpec:
        try:
            response = await self._client.get_model_config(model, as_json=True)
        except InferenceServerException as exc:
            raise TransientError(f"triton: cannot read the config of {model}: {exc.message()}") from exc
        return ModelSpec.from_triton_config(response["config"])

    async def register_system_shared_memory(self, name: str, key: str, byte_size: int) -> None:
        await self._client.register_system_shared_memory(name, key, byte_size)

    async def unregister_system_shared_memory(self, name: str) -> None:
        await self._client.unregister_system_shared_memory(name)

    async def load_model(self, model: str, config: Mapping[str, Any] | None = None) -> None:
        await self._client.load_model(model, config=json.dumps(config) if config else None)
