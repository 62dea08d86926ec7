"""Triton's inference messages: a ``ModelInferRequest`` built from arrays, and a response read back into them.

Tensors go into ``raw_input_contents`` with one copy and come back as
``np.frombuffer`` views with none. With a shared-memory pool (``worker.shm``),
fixed-size tensors travel through regions instead, and the message carries
only their names; an output read from a region stays a view of it until its
``InferResult`` is released. Pure but for the pool: no network here.

The errors Triton answers with become the worker's error types here too: by
gRPC status code where the call has one, by Triton's text where it has not.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import structlog
from numpy.typing import NDArray
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor
from tritonclient.utils.shared_memory import SharedMemoryException

from worker.errors import PermanentJobError, TransientError
from worker.models import NUMPY_DTYPES
from worker.shm import Region, ShmPool

log = structlog.get_logger(__name__)

#: gRPC codes that mean the server is (briefly) unreachable or overloaded.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
#: gRPC codes of a ``ModelInfer`` call Triton refused because the request was wrong. Triton maps
#: its own error codes onto gRPC's (INVALID_ARG to INVALID_ARGUMENT, UNSUPPORTED to UNIMPLEMENTED);
#: every other code is transient (NOT_FOUND is a model unknown or still loading: the catalog decides).
REJECTED_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})
#: Error texts of stream responses that mean "the request was wrong", not "try again".
PERMANENT_ERROR_MARKERS = (
    "unexpected inference input",
    "unexpected shape",
    "invalid",
    "unknown",
    "must be",
)


class ShmRefused(TransientError):
    """Triton could not use a shared-memory region (restarted, or not beside us): resend in the message."""


def _rejected(message: str) -> PermanentJobError:
    return PermanentJobError("inference_rejected", f"triton rejected the request: {message}")


def _about_shared_memory(message: str) -> bool:
    # Triton reports a region it cannot use with a generic code (NOT_FOUND, INVALID_ARG): only the
    # text tells it from any other failure, and it calls for a resend without regions.
    lowered = message.lower()
    return "shared memory" in lowered or "shared_memory" in lowered


def status_error(code: grpc.StatusCode, details: str) -> Exception:
    """The error a failed ``ModelInfer`` call means, by its gRPC status."""
    if code in RETRYABLE_CODES:
        return TransientError(f"triton: {code.name}: {details}")
    if _about_shared_memory(details):
        return ShmRefused(f"triton: {details}")
    if code in REJECTED_CODES:
        return _rejected(details)
    return TransientError(f"triton: {code.name}: {details}")


def response_error(message: str) -> Exception:
    """The error a stream's error response means.

    A ``ModelStreamInferResponse`` carries only Triton's error text, no status code, so on a
    stream the text is all there is to classify by.
    """
    lowered = message.lower()
    if _about_shared_memory(message):
        return ShmRefused(f"triton: {message}")
    if "not found" in lowered or "unavailable" in lowered or "not ready" in lowered:
        # A model that is unknown or still loading: the caller decides (catalog refresh or retry).
        return TransientError(f"triton: {message}")
    if any(marker in lowered for marker in PERMANENT_ERROR_MARKERS):
        return _rejected(message)
    return TransientError(f"triton: {message}")


@dataclass
class InferResult:
    """One response: the output tensors by name and the version that served it.

    Outputs that came back through shared memory are views of a pooled region:
    call ``release()`` once they have been used (encoded), not before.
    """

    outputs: Mapping[str, NDArray[Any]]
    model_version: str
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: Mapping[str, str] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)
    pool: ShmPool | None = None

    def release(self) -> None:
        if self.pool is not None:
            for region in self.regions:
                self.pool.release(region)
        self.regions = []


def point_at(parameters: Any, region: Region, nbytes: int) -> None:
    parameters["shared_memory_region"].string_param = region.name
    parameters["shared_memory_byte_size"].int64_param = nbytes
    parameters["shared_memory_offset"].int64_param = 0


def to_numpy(tensor: Any, raw: bytes) -> NDArray[Any]:
    """A response tensor as an array; fixed-size types are zero-copy views of the message."""
    if tensor.datatype == "BYTES":
        items: NDArray[Any] = deserialize_bytes_tensor(raw)
        return items.reshape(tuple(tensor.shape))
    return np.frombuffer(raw, dtype=NUMPY_DTYPES[tensor.datatype]).reshape(tuple(tensor.shape))


def to_raw(dtype: str, array: NDArray[Any]) -> bytes:
    if dtype == "BYTES":
        # Triton's BYTES layout: each element as a 4-byte little-endian length, then its bytes.
        return b"".join(struct.pack("<I", len(item)) + bytes(item) for item in array.flat)
    return np.ascontiguousarray(array).tobytes()


def read_response(infer: Any) -> InferResult:
    """A response's outputs as arrays; fixed-size types are zero-copy views of the message."""
    shapes = {tensor.name: tuple(tensor.shape) for tensor in infer.outputs}
    dtypes = {tensor.name: tensor.datatype for tensor in infer.outputs}
    # An output written to shared memory comes back with empty contents in its place.
    outputs = {
        tensor.name: to_numpy(tensor, raw)
        for tensor, raw in zip(infer.outputs, infer.raw_output_contents, strict=False)
        if raw or not all(tensor.shape)
    }
    return InferResult(outputs, infer.model_version, shapes, dtypes)


async def build_request(
    request_id: str,
    model: str,
    version: str,
    inputs: Sequence[tuple[str, str, NDArray[Any]]],
    *,
    parameters: Mapping[str, str] | None,
    limit_s: float,
    priority: int,
    shm_output: tuple[str, int] | None,
    regions: list[Region] | None,
    pool: ShmPool | None,
) -> service_pb2.ModelInferRequest:
    """A request carrying ``inputs`` (``(name, wire_dtype, array)``, batch dimension included).

    With a ``pool`` and a ``regions`` list, fixed-size inputs travel through regions, and so does the
    output named in ``shm_output`` (``(name, bytes it needs)``); each region taken is appended to
    ``regions`` as it is taken, so the caller can hand them back whatever happens. What does not fit
    the pool travels in the message.
    """
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, dtype, array in inputs:
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = dtype
        tensor.shape.extend(array.shape)
        region = None
        if regions is not None and pool is not None and dtype != "BYTES":
            region = await pool.acquire(array.nbytes)
        if region is not None and pool is not None:
            try:
                region.write(array)
            except SharedMemoryException as exc:
                log.warning("shm_write_failed", model=model, region=region.name, error=str(exc))
                await pool.discard(region)
                region = None
        if region is None or regions is None:
            request.raw_input_contents.append(to_raw(dtype, array))
        else:
            regions.append(region)
            point_at(tensor.parameters, region, array.nbytes)
    if regions is not None and shm_output is not None and pool is not None:
        region = await pool.acquire(shm_output[1])
        if region is not None:
            regions.append(region)
            output = request.outputs.add()
            output.name = shm_output[0]
            point_at(output.parameters, region, shm_output[1])
    for key, value in (parameters or {}).items():
        request.parameters[key].string_param = value
    if priority:
        request.parameters["priority"].uint64_param = priority
    # Triton drops a request still queued past its timeout, which keeps a backlog from going stale.
    request.parameters["timeout"].int64_param = int(limit_s * 1_000_000)
    return request


def attach_regions(
    result: InferResult, request: service_pb2.ModelInferRequest, regions: list[Region], pool: ShmPool
) -> InferResult:
    """Swap outputs written to a region for views of it; keep those regions until ``release``."""
    outputs = dict(result.outputs)
    by_name = {region.name: region for region in regions}
    kept: list[Region] = []
    for output in request.outputs:
        region = by_name.pop(output.parameters["shared_memory_region"].string_param)
        outputs[output.name] = region.array(NUMPY_DTYPES[result.dtypes[output.name]], result.shapes[output.name])
        kept.append(region)
    for region in by_name.values():
        pool.release(region)  # an input region: Triton has read it
    return InferResult(outputs, result.model_version, result.shapes, result.dtypes, kept, pool)
