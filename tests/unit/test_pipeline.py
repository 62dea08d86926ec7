"""The fate of one job, decided in one place: ack, record and ack, nack, or nack on cancellation.

The pipeline's clients are small interfaces; here they are in-memory stand-ins
so each decision can be driven alone. The real components are exercised by
tests/integration.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from PIL import Image

from devstack.samples import sample_image
from worker.catalog import Catalog
from worker.client import build_job, encode_job
from worker.config import Settings
from worker.consumer import Delivery
from worker.errors import PermanentJobError, TransientError
from worker.jobs import GcsRef
from worker.models import ModelSpec
from worker.pipeline import DUPLICATE, FAILED_PERMANENT, NACKED, SUCCEEDED, Pipeline
from worker.scheduling import PixelBudget
from worker.wire import InferResult

pytestmark = pytest.mark.timeout(30)

ENHANCE = {
    "name": "enhance",
    "max_batch_size": 8,
    "input": [{"name": "image", "data_type": "TYPE_UINT8", "dims": ["-1", "-1", "3"]}],
    "output": [{"name": "output", "data_type": "TYPE_UINT8", "dims": ["-1", "-1", "3"]}],
}


class Control:
    async def repository_index(self) -> list[dict[str, str]]:
        return [{"name": "enhance", "version": "1", "state": "READY"}]

    async def model_spec(self, model: str) -> ModelSpec:
        return ModelSpec.from_triton_config(ENHANCE)


@dataclass
class Storage:
    objects: dict[str, bytes] = field(default_factory=dict)
    writes: int = 0
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)

    async def read_input(self, ref: GcsRef, max_bytes: int) -> bytes:
        if ref.uri not in self.objects:
            raise PermanentJobError("input_not_found", ref.uri)
        return self.objects[ref.uri]

    async def write_once(self, ref: GcsRef, data: bytes, content_type: str, metadata: Any = None) -> bool:
        self.writes += 1
        if ref.uri in self.objects:
            return False
        self.objects[ref.uri] = data
        self.metadata[ref.uri] = dict(metadata or {})
        return True

    async def read_metadata(self, ref: GcsRef) -> dict[str, str] | None:
        return self.metadata.get(ref.uri) if ref.uri in self.objects else None

    async def read_json(self, ref: GcsRef) -> dict[str, Any] | None:
        data = self.objects.get(ref.uri)
        return json.loads(data) if data is not None else None


@dataclass
class Stream:
    """Echoes the image back; ``fail`` raises instead, ``gate`` holds every request until set."""

    fail: Exception | None = None
    gate: asyncio.Event | None = None
    calls: int = 0
    called: asyncio.Event = field(default_factory=asyncio.Event)

    async def infer(self, model: str, version: str, inputs: Any, **_: Any) -> InferResult:
        self.calls += 1
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return InferResult({"output": np.array(inputs[0][2])}, "1")


@dataclass
class Message:
    """What the consumer hears of one delivery: acks and nacks."""

    acks: int = 0
    nacks: int = 0

    def settle(self, _: Delivery, acked: bool) -> None:
        if acked:
            self.acks += 1
        else:
            self.nacks += 1


def delivery(data: bytes, attempt: int | None = 1, held_s: float = 0.0) -> tuple[Delivery, Message]:
    message = Message()
    return (
        Delivery(
            message_id="m1",
            data=data,
            attributes={},
            publish_time=time.time(),
            delivery_attempt=attempt,
            _settle=message.settle,
            received_at=time.monotonic() - held_s,
        ),
        message,
    )


class CountingExecutor(ThreadPoolExecutor):
    """A thread pool that counts the work handed to it."""

    submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def make(
    stream: Stream,
    storage: Storage,
    executor: ThreadPoolExecutor | None = None,
    pixels: PixelBudget | None = None,
    tuning: dict[str, Any] | None = None,
    **overrides: Any,
) -> Pipeline:
    """A pipeline on fakes; ``tuning`` goes to the constructor (its internal knobs), ``overrides`` to Settings."""
    settings = Settings(input_bucket="inputs", output_bucket="outputs", **overrides)
    pool = executor or ThreadPoolExecutor(2)
    options: dict[str, Any] = {"retry_base_s": 0.001, **(tuning or {})}
    catalog = Catalog(Control())  # type: ignore[arg-type]
    return Pipeline(settings, stream, catalog, storage, pool, pixels=pixels, **options)  # type: ignore[arg-type]


def job_bytes(job_id: str = "j1", uri: str = "gs://inputs/a.jpg") -> bytes:
    return encode_job(build_job("enhance", input_uri=uri, job_id=job_id))


async def test_success_writes_result_and_record_then_acks() -> None:
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10)})
    pipeline = make(Stream(), storage)
    d, message = delivery(job_bytes())
    assert await pipeline.handle(d) == SUCCEEDED
    assert (message.acks, d.nacked) == (1, False)
    record = json.loads(storage.objects["gs://outputs/results/j1.json"])
    assert record["status"] == "SUCCEEDED"
    assert record["output_uri"] == "gs://outputs/results/j1.jpg"
    assert "gs://outputs/results/j1.jpg" in storage.objects


async def test_bad_input_is_recorded_and_acked_never_retried() -> None:
    storage = Storage({"gs://inputs/a.jpg": b"not an image"})
    stream = Stream()
    d, message = delivery(job_bytes())
    assert await make(stream, storage).handle(d) == FAILED_PERMANENT
    assert (message.acks, d.nacked, stream.calls) == (1, False, 0)
    assert json.loads(storage.objects["gs://outputs/results/j1.json"])["error_code"] == "not_an_image"


async def test_a_malformed_message_is_recorded_under_its_message_id() -> None:
    storage = Storage()
    d, message = delivery(b"\x00garbage")
    assert await make(Stream(), storage).handle(d) == FAILED_PERMANENT
    assert message.acks == 1
    assert json.loads(storage.objects["gs://outputs/results/_invalid/m1.json"])["error_code"] == "invalid_message"


async def test_transient_failures_are_retried_then_nacked() -> None:
    stream = Stream(fail=TransientError("triton unavailable"))
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10)})
    d, message = delivery(job_bytes())
    assert await make(stream, storage).handle(d) == NACKED
    assert stream.calls == 3
    assert (message.acks, d.nacked) == (0, True)
    assert "gs://outputs/results/j1.json" not in storage.objects


async def test_duplicates_in_flight_are_processed_once() -> None:
    gate = asyncio.Event()
    stream = Stream(gate=gate)
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10)})
    pipeline = make(stream, storage)
    (first, m1), (second, m2) = delivery(job_bytes()), delivery(job_bytes())
    tasks = [asyncio.create_task(pipeline.handle(first)), asyncio.create_task(pipeline.handle(second))]
    await asyncio.wait_for(stream.called.wait(), 10)  # the first reached Triton; the second waits on it
    gate.set()
    assert sorted(await asyncio.gather(*tasks)) == sorted([SUCCEEDED, DUPLICATE])
    assert stream.calls == 1
    assert (m1.acks, m2.acks) == (1, 1)


async def test_a_redelivery_of_a_finished_job_is_acked_without_recomputing() -> None:
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10)})
    stream = Stream()
    pipeline = make(stream, storage)
    assert await pipeline.handle(delivery(job_bytes())[0]) == SUCCEEDED
    writes = storage.writes
    again, message = delivery(job_bytes(), attempt=2)
    assert await pipeline.handle(again) == DUPLICATE
    assert (stream.calls, storage.writes, message.acks) == (1, writes, 1)


async def test_a_job_outliving_its_lease_is_nacked() -> None:
    stream = Stream(gate=asyncio.Event())  # Triton never answers
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10)})
    # Received almost a whole max_lease_duration (600 s by default) ago.
    d, message = delivery(job_bytes(), held_s=595.0)
    assert await make(stream, storage).handle(d) == NACKED
    assert (message.acks, d.nacked) == (0, True)


async def test_cancellation_nacks_and_propagates() -> None:
    stream = Stream(gate=asyncio.Event())
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10)})
    d, message = delivery(job_bytes())
    task = asyncio.create_task(make(stream, storage).handle(d))
    await asyncio.wait_for(stream.called.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (message.acks, d.nacked) == (0, True)


async def test_a_job_gives_its_pixels_back_whatever_the_outcome() -> None:
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10)})
    stream = Stream()
    stream.fail = TransientError("triton down")
    pixels = PixelBudget(limit=1)
    pipeline = make(stream, storage, pixels=pixels)
    d, _ = delivery(job_bytes())
    assert await pipeline.handle(d) == NACKED
    assert pixels.used == 0
    stream.fail = None
    d, _ = delivery(job_bytes(job_id="j2"))
    assert await pipeline.handle(d) == SUCCEEDED
    assert pixels.used == 0


@dataclass
class Watching(Stream):
    """Keeps a weak reference to every input array; ``down`` fails each call with a new exception.

    Not ``fail``: an exception raised again keeps its last traceback, and with it the arrays.
    """

    down: bool = False
    seen: list[weakref.ref[Any]] = field(default_factory=list)

    async def infer(self, model: str, version: str, inputs: Any, **options: Any) -> InferResult:
        self.seen.append(weakref.ref(inputs[0][2]))
        if self.down:
            raise TransientError("triton down")
        return await super().infer(model, version, inputs, **options)


@pytest.mark.parametrize(("down", "outcome"), [(False, SUCCEEDED), (True, NACKED)])
async def test_a_job_frees_its_arrays_without_the_garbage_collector(down: bool, outcome: str) -> None:
    # The worker collects cyclic garbage rarely (cli.tune_gc): a job's pixels must not wait for it.
    storage = Storage({"gs://inputs/a.jpg": sample_image(64, 48)})
    stream = Watching(down=down)
    pipeline = make(stream, storage)
    gc.collect()
    gc.disable()
    try:
        d, _ = delivery(job_bytes())
        assert await pipeline.handle(d) == outcome
        assert stream.seen and all(ref() is None for ref in stream.seen)
    finally:
        gc.enable()


@pytest.mark.parametrize(("inline_max_pixels", "handed_to_threads"), [(1024, 0), (1023, 2)])
async def test_small_images_are_decoded_and_encoded_inline(inline_max_pixels: int, handed_to_threads: int) -> None:
    # A 32x32 image (a bucket size, so not padded): 1,024 pixels in, and (the identity model) 1,024 out.
    storage = Storage({"gs://inputs/a.jpg": sample_image(32, 32)})
    pool = CountingExecutor(2)
    pipeline = make(Stream(), storage, pool, tuning={"inline_max_pixels": inline_max_pixels})
    d, _ = delivery(job_bytes())
    assert await pipeline.handle(d) == SUCCEEDED
    assert pool.submitted == handed_to_threads


def other_job(job_id: str = "j1", **options: Any) -> bytes:
    return encode_job(build_job("enhance", job_id=job_id, **{"input_uri": "gs://inputs/b.jpg", **options}))


def delivered(data: bytes, message_id: str, attempt: int | None = 1) -> tuple[Delivery, Message]:
    d, message = delivery(data, attempt)
    d.message_id = message_id
    return d, message


@pytest.mark.parametrize("attempt", [1, 2])
async def test_a_second_job_under_a_taken_id_fails_without_touching_the_first(attempt: int) -> None:
    # Sent after the victim finished, a job reusing its id must not be acked as a "duplicate" of it.
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10), "gs://inputs/b.jpg": sample_image(30, 10, seed=1)})
    pipeline = make(Stream(), storage)
    assert await pipeline.handle(delivered(job_bytes(), "victim")[0]) == SUCCEEDED
    before = dict(storage.objects)
    d, message = delivered(other_job(), "attacker", attempt)
    assert await pipeline.handle(d) == FAILED_PERMANENT
    assert message.acks == 1
    assert {uri: data for uri, data in storage.objects.items() if uri in before} == before
    record = json.loads(storage.objects["gs://outputs/results/_invalid/attacker.json"])
    assert record["error_code"] == "job_id_conflict"
    # The victim's redelivery is still the same job.
    assert await pipeline.handle(delivered(job_bytes(), "victim", 2)[0]) == DUPLICATE


async def test_the_first_job_under_an_id_keeps_it_against_a_later_one() -> None:
    # The attacker's job, sent first, finished: the victim's own job fails; it is never acked as done.
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10), "gs://inputs/b.jpg": sample_image(30, 10, seed=1)})
    pipeline = make(Stream(), storage)
    assert await pipeline.handle(delivered(other_job(), "first")[0]) == SUCCEEDED
    assert await pipeline.handle(delivered(job_bytes(), "second")[0]) == FAILED_PERMANENT
    record = json.loads(storage.objects["gs://outputs/results/_invalid/second.json"])
    assert record["error_code"] == "job_id_conflict"
    # A result already there under the same name, with another job's fingerprint, is a conflict too.
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10), "gs://inputs/b.jpg": sample_image(30, 10, seed=1)})
    storage.objects["gs://outputs/results/j1.jpg"] = b"someone else's pixels"
    storage.metadata["gs://outputs/results/j1.jpg"] = {"fingerprint": "f" * 32}
    assert await make(Stream(), storage).handle(delivered(job_bytes(), "third")[0]) == FAILED_PERMANENT
    assert "gs://outputs/results/j1.json" not in storage.objects


async def test_a_job_in_flight_keeps_its_id_against_another() -> None:
    gate = asyncio.Event()
    stream = Stream(gate=gate)
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10), "gs://inputs/b.jpg": sample_image(30, 10, seed=1)})
    pipeline = make(stream, storage)
    first = asyncio.create_task(pipeline.handle(delivered(job_bytes(), "first")[0]))
    await asyncio.wait_for(stream.called.wait(), 10)
    assert await pipeline.handle(delivered(other_job(), "second")[0]) == FAILED_PERMANENT
    gate.set()
    assert await first == SUCCEEDED
    assert json.loads(storage.objects["gs://outputs/results/j1.json"])["status"] == "SUCCEEDED"


async def test_an_invalid_message_records_only_under_invalid_whatever_id_it_names() -> None:
    # Its FAILED record must not take the name of the victim's record, or the victim's own would be refused.
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10)})
    pipeline = make(Stream(), storage)
    for bad in (other_job(output_format="gif"), other_job(input_uri="gs://elsewhere/x.jpg")):
        assert await pipeline.handle(delivered(bad, "bad")[0]) == FAILED_PERMANENT
        assert "gs://outputs/results/j1.json" not in storage.objects
        storage.objects.pop("gs://outputs/results/_invalid/bad.json")
    assert await pipeline.handle(delivered(job_bytes(), "victim")[0]) == SUCCEEDED
    assert json.loads(storage.objects["gs://outputs/results/j1.json"])["status"] == "SUCCEEDED"


@pytest.mark.parametrize("params", [{"scale": "abc"}, {"scale": "1000"}, {"sequence_id": "1"}])
async def test_undeclared_or_bad_params_fail_the_job_once(params: dict[str, str]) -> None:
    # "abc" must not crash the pixel weighing (nacked until dead-lettered); "1000" must not weigh 10^9 pixels.
    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10)})
    stream = Stream()
    d, message = delivered(other_job(input_uri="gs://inputs/a.jpg", params=params), "m")
    assert await make(stream, storage).handle(d) == FAILED_PERMANENT
    assert (message.acks, stream.calls) == (1, 0)
    assert json.loads(storage.objects["gs://outputs/results/j1.json"])["error_code"] == "invalid_param"


async def test_metric_labels_take_only_values_the_catalog_knows() -> None:
    from prometheus_client import REGISTRY

    storage = Storage({"gs://inputs/a.jpg": sample_image(20, 10)})
    pipeline = make(Stream(), storage)
    for i in range(3):
        job = other_job(f"v{i}", input_uri="gs://inputs/a.jpg", version=str(900_000 + i))
        assert await pipeline.handle(delivered(job, f"m{i}")[0]) == FAILED_PERMANENT
    labels = {
        sample.labels["version"]
        for metric in REGISTRY.collect()
        if metric.name == "tritonq_jobs"
        for sample in metric.samples
    }
    assert not any(label.startswith("9000") for label in labels)
    assert "unknown" in labels


async def test_a_message_over_the_inline_limit_is_refused_before_parsing() -> None:
    storage = Storage()
    pipeline = make(Stream(), storage, max_inline_bytes=1024)
    d, _ = delivered(b"{" + b" " * 100_000 + b"}", "big")
    assert await pipeline.handle(d) == FAILED_PERMANENT
    record = json.loads(storage.objects["gs://outputs/results/_invalid/big.json"])
    assert record["error_code"] == "too_large"


@pytest.mark.parametrize(("inline_max_bytes", "handed_to_threads"), [(1 << 20, 0), (100, 1)])
async def test_images_of_many_encoded_bytes_are_decoded_in_threads(
    inline_max_bytes: int, handed_to_threads: int
) -> None:
    # Few pixels do not make a decode cheap (a progressive JPEG re-walks them per scan): bytes count too.
    storage = Storage({"gs://inputs/a.jpg": sample_image(32, 32)})
    pool = CountingExecutor(2)
    pipeline = make(Stream(), storage, pool, tuning={"inline_max_pixels": 4096, "inline_max_bytes": inline_max_bytes})
    assert await pipeline.handle(delivery(job_bytes())[0]) == SUCCEEDED
    assert pool.submitted == handed_to_threads  # the decode; the encode (no input bytes) stays inline


async def test_a_job_weighs_its_formats_worst_case_bytes_per_pixel_in_the_budget() -> None:
    # A lossless WebP takes 18 bytes a pixel while it decodes, four times a JPEG's: it holds four times the pixels.
    out = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(out, "WEBP", lossless=True)
    gate = asyncio.Event()
    stream = Stream(gate=gate)
    storage = Storage({"gs://inputs/a.jpg": sample_image(32, 32), "gs://inputs/b.webp": out.getvalue()})
    pixels = PixelBudget(limit=1 << 30)
    pipeline = make(stream, storage, pixels=pixels, tuning={"shape_buckets_px": ()})
    held = []
    for uri in ("gs://inputs/a.jpg", "gs://inputs/b.webp"):
        stream.called.clear()
        task = asyncio.create_task(pipeline.handle(delivered(other_job(uri.rsplit("/", 1)[-1], input_uri=uri), uri)[0]))
        await asyncio.wait_for(stream.called.wait(), 10)
        held.append(pixels.used)
        gate.set()
        assert await task == SUCCEEDED
        gate.clear()
    jpeg_weight = 32 * 32 * 2  # the decoded input and the model's output
    assert held == [jpeg_weight, jpeg_weight + round(32 * 32 * (18.0 / 4.5 - 1))]


@dataclass
class Expiring(Stream):
    """Triton down for as long as it takes the job's deadline to pass; keeps a weak reference to the tensor."""

    down_s: float = 0.0
    seen: list[weakref.ref[Any]] = field(default_factory=list)

    async def infer(self, model: str, version: str, inputs: Any, **_: Any) -> InferResult:
        self.calls += 1
        array = inputs[0][2]
        self.seen.append(weakref.ref(array if array.base is None else array.base))
        await asyncio.sleep(self.down_s)  # the time the deadline needs to pass, not a hand-off between tasks
        raise TransientError("triton down")


async def test_a_job_whose_deadline_passes_while_it_retries_is_recorded_and_frees_its_arrays() -> None:
    # Each job gets its own deadline_exceeded error: one instance raised again would keep the
    # tracebacks of every job it failed, and with them their arrays.
    storage = Storage({"gs://inputs/a.jpg": sample_image(64, 48)})
    stream = Expiring(down_s=0.1)
    pipeline = make(stream, storage)
    gc.collect()
    gc.disable()
    try:
        for job_id in ("j1", "j2"):
            data = encode_job(build_job("enhance", input_uri="gs://inputs/a.jpg", job_id=job_id, timeout_s=0.05))
            d, message = delivery(data)
            assert await pipeline.handle(d) == FAILED_PERMANENT
            assert message.acks == 1
            record = json.loads(storage.objects[f"gs://outputs/results/{job_id}.json"])
            assert record["error_code"] == "deadline_exceeded"
        assert stream.calls == 2  # once each: a retry after the deadline is not sent
        assert all(ref() is None for ref in stream.seen)
    finally:
        gc.enable()
