"""The GCS client against the real GCS emulator: create-only writes, input errors, names, listing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from worker.errors import PermanentJobError
from worker.jobs import GcsRef
from worker.stack import Stack, create_bucket
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
