"""The Triton connection's lanes: a broken stream fails what it carried and reopens, a stalled one is torn down.

Triton here is an in-process gRPC server on loopback speaking Triton's protocol
(``GRPCInferenceService``), whose streams can be told to answer, to end, or to
fall silent: what a restarted or wedged Triton does to a stream, on demand.
The real Triton killed mid-run is tests/integration/test_faults.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs
from tritonclient.grpc import service_pb2, service_pb2_grpc

from worker import triton
from worker.errors import PermanentJobError, TransientError
from worker.triton import StreamBroken, TritonStream

pytestmark = pytest.mark.timeout(30)

IMAGE = np.zeros((1, 2, 2, 3), np.uint8)
REJECTION = "[request id: r0] unexpected shape for input 'image' for model 'enhance'"


@dataclass
class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Each stream it accepts follows the next entry of ``plans``, then ``answer``.

    ``answer``: one response per request. ``reject``: an error response per request, as Triton
    sends for a request it refuses. ``end``: end the stream once ``requests`` requests are in.
    ``silent``: read requests and never answer.
    """

    plans: list[str] = field(default_factory=list)
    requests: int = 1
    streams: int = 0
    received: asyncio.Event = field(default_factory=asyncio.Event)
    reopened: asyncio.Event = field(default_factory=asyncio.Event)
    unary_error: tuple[grpc.StatusCode, str] | None = None

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        self.streams += 1
        if self.streams > 1:
            self.reopened.set()
        await context.send_initial_metadata(())
        plan = self.plans.pop(0) if self.plans else "answer"
        seen = 0
        async for request in request_iterator:
            seen += 1
            self.received.set()
            if plan == "answer":
                yield service_pb2.ModelStreamInferResponse(infer_response=response(request))
            elif plan == "reject":
                rejected = service_pb2.ModelInferResponse(id=request.id)
                yield service_pb2.ModelStreamInferResponse(error_message=REJECTION, infer_response=rejected)
            elif plan == "end" and seen >= self.requests:
                return

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        if self.unary_error is not None:
            await context.abort(*self.unary_error)
        return response(request)


def response(request: Any) -> service_pb2.ModelInferResponse:
    answer = service_pb2.ModelInferResponse(id=request.id, model_name=request.model_name, model_version="1")
    output = answer.outputs.add()
    output.name, output.datatype = "output", "UINT8"
    output.shape.extend(IMAGE.shape)
    answer.raw_output_contents.append(IMAGE.tobytes())
    return answer


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[FakeTriton, str]]:
    monkeypatch.setattr(triton, "RECONNECT_BASE_S", 0.01)  # reopen at once: the tests wait on it
    fake = FakeTriton()
    grpc_server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        await grpc_server.stop(None)


@pytest.fixture
async def connect(server: tuple[FakeTriton, str]) -> AsyncIterator[Any]:
    streams: list[TritonStream] = []

    async def make(**options: Any) -> TritonStream:
        stream = TritonStream(server[1], **{"request_timeout_s": 5.0, **options})
        await stream.start()
        streams.append(stream)
        return stream

    try:
        yield make
    finally:
        for stream in streams:
            await stream.stop()


def infer(stream: TritonStream, timeout_s: float | None = None) -> Any:
    return stream.infer("enhance", "", [("image", "UINT8", IMAGE)], timeout_s=timeout_s)


def reconnects() -> float:
    return REGISTRY.get_sample_value("tritonq_triton_stream_reconnects_total") or 0.0


async def test_requests_on_a_stream_that_ends_fail_each_with_its_own_error_and_the_lane_reopens(
    server: tuple[FakeTriton, str], connect: Any
) -> None:
    fake, _ = server
    fake.plans, fake.requests = ["end"], 2
    stream = await connect()
    before = reconnects()
    first, second = await asyncio.gather(infer(stream), infer(stream), return_exceptions=True)
    assert isinstance(first, StreamBroken) and isinstance(second, StreamBroken)
    assert first is not second  # one exception per request: no traceback is shared between jobs
    result = await infer(stream)  # queued until the lane reopened, then answered
    assert result.model_version == "1"
    np.testing.assert_array_equal(result.outputs["output"], IMAGE)
    assert fake.streams == 2
    assert stream.lanes == 1
    assert reconnects() == before + 1


async def test_a_stream_that_falls_silent_is_torn_down_and_reopened(
    server: tuple[FakeTriton, str], connect: Any
) -> None:
    fake, _ = server
    fake.plans = ["silent"]
    # Stalled means no response for request_timeout_s while a request waited longer than that.
    stream = await connect(request_timeout_s=0.1)
    with capture_logs() as logs, pytest.raises(TransientError, match="timed out"):
        await infer(stream, timeout_s=0.5)
    assert any(event["event"] == "triton_stream_stalled" for event in logs)
    # A request sent while the stalled stream is torn down may still go out on it and be failed
    # with it (the pipeline retries it); one sent once the lane has reopened is answered.
    await asyncio.wait_for(fake.reopened.wait(), 5)
    result = await infer(stream, timeout_s=5.0)
    assert result.model_version == "1"
    assert fake.streams == 2


async def test_a_slow_answer_within_its_deadline_keeps_the_stream(server: tuple[FakeTriton, str], connect: Any) -> None:
    fake, _ = server
    stream = await connect()
    for _ in range(3):
        assert (await infer(stream)).model_version == "1"
    assert fake.streams == 1


async def test_stop_fails_what_is_pending_and_closes(server: tuple[FakeTriton, str], connect: Any) -> None:
    fake, _ = server
    fake.plans = ["silent"]
    stream = await connect()
    pending = asyncio.create_task(infer(stream))
    await asyncio.wait_for(fake.received.wait(), 5)
    await stream.stop()
    with pytest.raises(TransientError, match="stopped"):
        await pending
    assert stream.in_flight == 0


@pytest.mark.parametrize(
    ("code", "details", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape for input 'image'", PermanentJobError),
        (grpc.StatusCode.UNIMPLEMENTED, "datatype not supported", PermanentJobError),
        (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'enhance' is not found", TransientError),
        (grpc.StatusCode.UNAVAILABLE, "model is not ready", TransientError),
    ],
)
async def test_a_unary_call_fails_by_its_status_code(
    server: tuple[FakeTriton, str], connect: Any, code: grpc.StatusCode, details: str, error: type[Exception]
) -> None:
    fake, _ = server
    fake.unary_error = (code, details)
    stream = await connect(mode="unary")
    with pytest.raises(error) as caught:
        await infer(stream)
    assert isinstance(caught.value, PermanentJobError) == (error is PermanentJobError)


async def test_a_stream_error_response_fails_only_its_request(server: tuple[FakeTriton, str], connect: Any) -> None:
    # A stream's error response carries Triton's text and no status code: the text decides.
    fake, _ = server
    fake.plans = ["reject"]
    stream = await connect()
    with pytest.raises(PermanentJobError, match="unexpected shape"):
        await infer(stream)
    assert fake.streams == 1  # the stream itself stays up
