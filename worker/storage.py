"""GCS reads and idempotent writes, and the names results are written under.

The client is ``gcloud-aio-storage``: asyncio-native, on the aiohttp the
worker already uses, so a request in flight costs no thread and the CPU stays
with image work (``python -m bench.storage_clients`` compares it with
``google-cloud-storage`` in a thread pool; the README's Performance section
has the figures).

Writes are create-only (``ifGenerationMatch=0``): Pub/Sub delivers at least
once, so the same job may be finished twice, and the second write of a result
finds the first and counts as success. Status codes map to the error types
through ``_INPUT_ERRORS`` and ``_RETRYABLE``; the caller's context decides whether a missing object is
the job's fault (an input) or nothing at all (a record not yet written).

Names: a job's record is ``{job_id}.json`` and its result ``{job_id}.{ext}``
(``jpg``, ``png``, ``webp``, ``{kind}.json``, ``{kind}.npy``); job ids never end
in ``.{kind}`` (``jobs.valid_job_id``), so no record is named like a result.
Every object carries the writing job's fingerprint in its metadata, so a job
that finds its name taken can tell itself from another job.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import aiohttp
from gcloud.aio.storage import Storage as AioStorage

from worker import telemetry
from worker.errors import PermanentJobError, TransientError
from worker.jobs import GcsRef, join

T = TypeVar("T")

#: Seconds for one GCS request; a stalled emulator or network must not hold a job forever.
REQUEST_TIMEOUT_S = 30
#: Read inputs in chunks of this many bytes so an oversized object is refused
#: after at most one chunk beyond the limit, never buffered whole.
READ_CHUNK_BYTES = 1024 * 1024
#: Connections kept to GCS; above the pipeline's concurrency so writes never queue on the pool.
POOL_CONNECTIONS = 256

#: HTTP status of an input read to the error it means.
_INPUT_ERRORS: dict[int, tuple[str, str]] = {
    404: ("input_not_found", "input object not found"),
    403: ("input_forbidden", "the worker may not read the input object"),
    400: ("invalid_uri", "GCS refused the input name"),
}
#: Statuses worth retrying: throttling and server errors (GCS asks clients to retry 408, 429 and 5xx).
_RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})


def result_ref(output: GcsRef, job_id: str, extension: str) -> GcsRef:
    """``{prefix}/{job_id}.{ext}`` in the output bucket."""
    return GcsRef(output.bucket, join(output.name, f"{job_id}.{extension}"))


def record_ref(output: GcsRef, job_id: str) -> GcsRef:
    """``{prefix}/{job_id}.json``: the ``JobResult`` beside the result."""
    return result_ref(output, job_id, "json")


def _transient(exc: BaseException, what: str) -> TransientError:
    return TransientError(f"gcs {what}: {type(exc).__name__}: {exc}")


class Storage:
    """A thin async GCS client. ``STORAGE_EMULATOR_HOST`` points it at an emulator."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._client: AioStorage | None = None

    async def start(self) -> None:
        if self._client is not None:
            raise RuntimeError("Storage already started")
        connector = aiohttp.TCPConnector(limit=POOL_CONNECTIONS)
        self._session = aiohttp.ClientSession(connector=connector)
        self._client = AioStorage(session=self._session)  # type: ignore[arg-type]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._session is not None:
            # The client does not close a session it was handed.
            await self._session.close()
            self._session = None

    @property
    def client(self) -> AioStorage:
        if self._client is None:
            raise RuntimeError("Storage not started")
        return self._client

    async def read_input(self, ref: GcsRef, max_bytes: int) -> bytes:
        """Read a job's input; a missing or oversized object is the job's fault."""
        try:
            stream = await self.client.download_stream(ref.bucket, ref.name, timeout=REQUEST_TIMEOUT_S)
            async with stream:
                if stream.content_length > max_bytes:
                    raise PermanentJobError(
                        "too_large", f"{ref.uri} is {stream.content_length} bytes, limit {max_bytes}"
                    )
                chunks: list[bytes] = []
                size = 0
                while chunk := await stream.read(READ_CHUNK_BYTES):
                    size += len(chunk)
                    if size > max_bytes:
                        raise PermanentJobError("too_large", f"{ref.uri} is over the {max_bytes} byte limit")
                    chunks.append(chunk)
        except aiohttp.ClientResponseError as exc:
            if exc.status in _INPUT_ERRORS:
                code, text = _INPUT_ERRORS[exc.status]
                raise PermanentJobError(code, f"{text}: {ref.uri}") from exc
            raise _transient(exc, f"read {ref.uri}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transient(exc, f"read {ref.uri}") from exc
        data = b"".join(chunks)
        telemetry.BYTES_READ.inc(len(data))
        return data

    async def write_once(
        self, ref: GcsRef, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> bool:
        """Create ``ref`` with ``data``; ``False`` if it already existed (a redelivered job's earlier write)."""
        try:
            await self.client.upload(
                ref.bucket,
                ref.name,
                data,
                content_type=content_type,
                parameters={"ifGenerationMatch": "0"},
                # Always multipart: fake-gcs-server ignores ifGenerationMatch on plain media uploads,
                # and the create-only precondition is what makes a rewrite harmless.
                metadata={"metadata": dict(metadata or {})},
                timeout=REQUEST_TIMEOUT_S,
            )
        except aiohttp.ClientResponseError as exc:
            if exc.status == 412:
                return False
            if exc.status in _RETRYABLE:
                raise _transient(exc, f"write {ref.uri}") from exc
            # 403/404 on our own output bucket is a deployment problem: nack so nothing is lost.
            raise TransientError(f"gcs write {ref.uri}: HTTP {exc.status} {exc.message}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transient(exc, f"write {ref.uri}") from exc
        telemetry.BYTES_WRITTEN.inc(len(data))
        return True

    async def read_json(self, ref: GcsRef) -> dict[str, Any] | None:
        """A small JSON object (a result record), or ``None`` if it does not exist."""
        download = self.client.download(ref.bucket, ref.name, timeout=REQUEST_TIMEOUT_S)
        data = await _or_none_if_missing(download, f"read {ref.uri}")
        if data is None:
            return None
        document: dict[str, Any] = json.loads(data)
        return document

    async def read_metadata(self, ref: GcsRef) -> dict[str, str] | None:
        """An object's custom metadata (``{}`` if it has none), or ``None`` if the object does not exist."""
        call = self.client.download_metadata(ref.bucket, ref.name, timeout=REQUEST_TIMEOUT_S)
        document = await _or_none_if_missing(call, f"read metadata {ref.uri}")
        if document is None:
            return None
        return {str(k): str(v) for k, v in (document.get("metadata") or {}).items()}

    async def upload(self, ref: GcsRef, data: bytes, content_type: str) -> None:
        """Plain upload, overwriting: for producers' inputs, not results."""
        try:
            await self.client.upload(ref.bucket, ref.name, data, content_type=content_type, timeout=REQUEST_TIMEOUT_S)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _transient(exc, f"upload {ref.uri}") from exc

    async def list_names(self, bucket: str, prefix: str) -> set[str]:
        """Names of the objects under ``prefix`` (every page): one request per 1000 objects."""
        names: set[str] = set()
        params = {"prefix": prefix, "fields": "items(name),nextPageToken"}
        try:
            while True:
                page = await self.client.list_objects(bucket, params=params, timeout=REQUEST_TIMEOUT_S)
                names.update(item["name"] for item in page.get("items", []))
                if not page.get("nextPageToken"):
                    return names
                params["pageToken"] = page["nextPageToken"]
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _transient(exc, f"list gs://{bucket}/{prefix}") from exc


async def _or_none_if_missing(call: Awaitable[T], what: str) -> T | None:
    """Await a read: ``None`` when the object does not exist (404), ``TransientError`` on any other failure."""
    try:
        return await call
    except aiohttp.ClientResponseError as exc:
        if exc.status == 404:
            return None
        raise _transient(exc, what) from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _transient(exc, what) from exc
