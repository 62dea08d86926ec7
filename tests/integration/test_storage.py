"""The GCS client against the real GCS emulator: create-only writes, input errors, names, listing, and GCS's
throttling and server errors (played by a proxy in front of the emulator) as transient failures."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from devstack.stack import Stack
from worker.errors import PermanentJobError, TransientError
from worker.jobs import GcsRef
from worker.provision import create_bucket
from worker.storage import Storage


@pytest.fixture
async def storage(stack: Stack) -> AsyncIterator[tuple[Storage, str]]:
    bucket = f"storage-{uuid.uuid4().hex[:10]}"
    create_bucket(stack.gcs.url, "test", bucket)
    client = Storage()
    await client.start()
    try:
        yield client, bucket
    finally:
        await client.close()


async def test_write_once_creates_and_never_overwrites(storage: tuple[Storage, str]) -> None:
    client, bucket = storage
    ref = GcsRef(bucket, "results/j1.jpg")
    assert await client.write_once(ref, b"first", "image/jpeg", {"job_id": "j1"}) is True
    assert await client.write_once(ref, b"second", "image/jpeg", {"job_id": "j1"}) is False
    assert await client.read_input(ref, 1024) == b"first"


async def test_names_with_spaces_slashes_and_unicode_round_trip(storage: tuple[Storage, str]) -> None:
    client, bucket = storage
    names = ["a b/c d.json", "ünï/çødé #1?.json", "deep/er/x+y=z.json"]
    for i, name in enumerate(names):
        assert await client.write_once(GcsRef(bucket, name), f'{{"i": {i}}}'.encode(), "application/json")
    for i, name in enumerate(names):
        assert await client.read_json(GcsRef(bucket, name)) == {"i": i}
    assert await client.list_names(bucket, "") == set(names)


async def test_a_missing_input_is_the_jobs_fault_and_a_missing_record_is_none(storage: tuple[Storage, str]) -> None:
    client, bucket = storage
    with pytest.raises(PermanentJobError) as caught:
        await client.read_input(GcsRef(bucket, "nope.jpg"), 1024)
    assert caught.value.code == "input_not_found"
    assert await client.read_json(GcsRef(bucket, "nope.json")) is None


async def test_an_oversized_input_is_refused(storage: tuple[Storage, str]) -> None:
    client, bucket = storage
    ref = GcsRef(bucket, "big.bin")
    await client.upload(ref, b"x" * 5000, "application/octet-stream")
    with pytest.raises(PermanentJobError) as caught:
        await client.read_input(ref, 4999)
    assert caught.value.code == "too_large"
    assert await client.read_input(ref, 5000) == b"x" * 5000


async def test_upload_overwrites_and_listing_follows_pages(storage: tuple[Storage, str]) -> None:
    client, bucket = storage
    ref = GcsRef(bucket, "in/a.jpg")
    await client.upload(ref, b"one", "image/jpeg")
    await client.upload(ref, b"two", "image/jpeg")
    assert await client.read_input(ref, 100) == b"two"
    for i in range(1005):
        await client.write_once(GcsRef(bucket, f"many/{i:04d}.json"), b"{}", "application/json")
    names = await client.list_names(bucket, "many/")
    assert names == {f"many/{i:04d}.json" for i in range(1005)}


async def test_an_objects_metadata_carries_the_fingerprint_of_the_job_that_wrote_it(
    storage: tuple[Storage, str],
) -> None:
    # A job that finds its result's name taken tells itself from another job by this.
    client, bucket = storage
    ref = GcsRef(bucket, "results/j1.jpg")
    assert await client.write_once(ref, b"pixels", "image/jpeg", {"job_id": "j1", "fingerprint": "f" * 32}) is True
    assert await client.read_metadata(ref) == {"job_id": "j1", "fingerprint": "f" * 32}
    plain = GcsRef(bucket, "results/plain.jpg")
    await client.upload(plain, b"pixels", "image/jpeg")
    assert await client.read_metadata(plain) == {}
    assert await client.read_metadata(GcsRef(bucket, "results/nope.jpg")) is None


class FailingGcs:
    """An HTTP proxy in front of the GCS emulator that answers every request with ``status`` while set.

    The emulator never fails on its own; real GCS answers throttling with 429 and its own trouble
    with 500, 502, 503 or 504, with a JSON error body, and asks clients to retry them
    (cloud.google.com/storage/docs/retry-strategy). Everything else is passed through unchanged.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.status: int | None = None
        self.failed = 0
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.status is not None:
            self.failed += 1
            error = {"error": {"code": self.status, "message": "Backend Error", "errors": []}}
            return web.json_response(error, status=self.status)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=await request.read()
        ) as upstream:
            body = await upstream.read()
            kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            return web.Response(status=upstream.status, body=body, headers=kept)


#: Headers that describe one hop, not the message: the proxy's own connections set them anew.
HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})


@pytest.fixture
async def failing(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Storage, str, FailingGcs]]:
    bucket = f"storage-{uuid.uuid4().hex[:10]}"
    create_bucket(stack.gcs.url, "test", bucket)
    proxy = FailingGcs(stack.gcs.url)
    await proxy.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    client = Storage()
    await client.start()
    try:
        yield client, bucket, proxy
    finally:
        await client.close()
        await proxy.stop()


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_gcs_throttling_and_server_errors_are_transient(
    failing: tuple[Storage, str, FailingGcs], status: int
) -> None:
    client, bucket, proxy = failing
    ref = GcsRef(bucket, "results/j1.jpg")
    assert await client.write_once(ref, b"first", "image/jpeg") is True  # through the proxy
    proxy.status = status
    calls = [
        client.read_input(ref, 1024),
        client.read_json(GcsRef(bucket, "results/j1.json")),
        client.read_metadata(ref),
        client.write_once(GcsRef(bucket, "results/j2.jpg"), b"second", "image/jpeg"),
    ]
    for call in calls:
        with pytest.raises(TransientError, match=str(status)):
            await call
    assert proxy.failed == len(calls)
    proxy.status = None
    # The outage wrote nothing: the write that failed can be done now, once.
    assert await client.write_once(GcsRef(bucket, "results/j2.jpg"), b"second", "image/jpeg") is True
    assert await client.read_input(ref, 1024) == b"first"
