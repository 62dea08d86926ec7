"""The bad messages of the fault scenarios: every kind, from broken ones to hostile ones, and the code each must get.

A bad message must end in an error record with the code ``BAD_KINDS`` names
(or on the dead-letter topic), never in a result, a crash or a stall.
``build`` makes ``count`` of them, the kinds in turn, with the inputs they
name uploaded first.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chaos.bad_inputs import huge_png, scan_bomb, tiff_tile_bomb, webp_bomb
from devstack.samples import sample_image
from worker.client import JobClient, build_job, encode_job
from worker.config import Settings
from worker.jobs import ImageJob
from worker.jobs import max_message_bytes as jobs_max_message_bytes

#: Size of the image whose first half is the truncated JPEG.
TRUNCATED_SIZE = (64, 64)

#: Every kind of bad message, from broken ones to hostile ones, and the error code its record must
#: carry. A message that is no valid job (or another job under a taken id) is recorded under
#: ``_invalid/{message_id}``; a valid job that fails, under its id.
BAD_KINDS: dict[str, str] = {
    "not_json_or_protobuf": "invalid_message",
    "wrong_field_types": "invalid_message",
    "unknown_model": "unknown_model",
    "unknown_version": "unknown_version",
    "missing_input": "input_not_found",
    "not_an_image": "not_an_image",
    "truncated_jpeg": "corrupt_image",
    "huge_png": "too_large",
    "inline_over_cap": "too_large",
    "job_id_traversal": "invalid_job_id",
    "bucket_off_allowlist": "bucket_not_allowed",
    "empty_message": "invalid_message",
    # Taking over another job's result.
    "job_id_conflict": "job_id_conflict",
    "invalid_with_taken_id": "invalid_format",
    "record_named_like_a_result": "invalid_job_id",
    # Memory and CPU far past what the file's size suggests.
    "tiff_tile_bomb": "too_large",
    "webp_lossless_bomb": "too_large",
    "progressive_scan_bomb": "too_complex",
    # Params.
    "param_out_of_range": "invalid_param",
    "param_not_a_number": "invalid_param",
    "param_for_triton": "invalid_param",
    # Amplifiers: metric series, error texts, parsing time.
    "version_flood": "unknown_version",
    "huge_error_text": "invalid_format",
    "oversized_message": "too_large",
    "params_flood": "invalid_message",
    # Names GCS refuses.
    "job_id_newline": "invalid_job_id",
    "input_name_dotdot": "invalid_uri",
}
#: A forged W3C trace context, sent as a job param rather than as the message's attribute.
FORGED_TRACEPARENT = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"


@dataclass(frozen=True)
class BadMessage:
    """A message the worker must refuse: where its error record must appear, and with which code."""

    kind: str
    data: bytes
    attributes: Mapping[str, str]
    job_id: str | None  # None: no readable job_id, the record is keyed by message id
    message_id: str = ""


async def build(
    client: JobClient,
    settings: Settings,
    name: str,
    count: int,
    uris: list[str],
    *,
    taken: list[ImageJob] | None = None,
    model: str,
) -> list[BadMessage]:
    """``count`` bad messages for jobs of ``model``, every kind in ``BAD_KINDS`` in turn; ``taken``: finished good
    jobs whose ids the takeover kinds reuse (without them, those kinds reuse ids of their own)."""
    bucket = settings.input_bucket
    not_image = await client.upload_bytes(b"this is plain text, not an image", f"chaos/{name}-text.jpg")
    whole = sample_image(*TRUNCATED_SIZE, seed=99)
    truncated = await client.upload_bytes(whole[: len(whole) // 2], f"chaos/{name}-truncated.jpg")
    huge = await client.upload_bytes(huge_png(), f"chaos/{name}-huge.png", "image/png")
    tiff = await client.upload_bytes(tiff_tile_bomb(), f"chaos/{name}-tile.tif", "image/tiff")
    webp = await client.upload_bytes(webp_bomb(), f"chaos/{name}-lossless.webp", "image/webp")
    scans = await client.upload_bytes(scan_bomb(), f"chaos/{name}-scans.jpg")
    limit = jobs_max_message_bytes(settings.max_inline_bytes)
    kinds = list(BAD_KINDS)
    made: list[BadMessage] = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        job_id = f"{name}-bad-{kind}-{i:04d}"
        victim = taken[i % len(taken)] if taken else build_job(model, input_uri=uris[0], job_id=job_id)

        def job(target: str = model, **options: Any) -> tuple[bytes, str | None]:
            built = build_job(target, job_id=job_id, **options)  # noqa: B023 - used at once
            return encode_job(built), built.job_id

        def invalid(target: str = model, **options: Any) -> tuple[bytes, str | None]:
            return encode_job(build_job(target, **{"job_id": job_id, **options})), None  # noqa: B023

        attributes: dict[str, str] = {}
        readable: str | None
        if kind == "not_json_or_protobuf":
            data, readable = f"this is not a job #{i}".encode(), None
        elif kind == "wrong_field_types":
            data, readable = json.dumps({"jobId": job_id, "model": 42, "params": [1, 2]}).encode(), None
        elif kind == "unknown_model":
            data, readable = job("no_such_model", input_uri=uris[0])
        elif kind == "unknown_version":
            data, readable = job(input_uri=uris[0], version="99")
        elif kind == "missing_input":
            data, readable = job(input_uri=f"gs://{bucket}/chaos/missing-{i}.jpg")
        elif kind == "not_an_image":
            data, readable = job(input_uri=not_image)
        elif kind == "truncated_jpeg":
            data, readable = job(input_uri=truncated)
        elif kind == "huge_png":
            data, readable = job(input_uri=huge)
        elif kind == "inline_over_cap":
            data, readable = invalid(input_bytes=random.Random(i).randbytes(settings.max_inline_bytes + 1024))
        elif kind == "job_id_traversal":
            data, readable = invalid(input_uri=uris[0], job_id=f"../{job_id}")
        elif kind == "bucket_off_allowlist":
            data, readable = invalid(input_uri="gs://someone-elses-bucket/x.jpg")
        elif kind == "job_id_conflict":
            # A valid job under an id a finished job holds, on another input: it must not pass for it.
            other = next(uri for uri in [*uris, not_image] if uri != victim.input_uri)
            data, readable = invalid(
                input_uri=other,
                job_id=victim.job_id,
                version=victim.model_version,
                output_prefix=victim.output_prefix,
            )
        elif kind == "invalid_with_taken_id":
            data, readable = invalid(
                input_uri=uris[0], job_id=victim.job_id, output_format="gif", output_prefix=victim.output_prefix
            )
        elif kind == "record_named_like_a_result":
            data, readable = invalid(
                input_uri=uris[0], job_id=f"{victim.job_id}.embedding", output_prefix=victim.output_prefix
            )
        elif kind == "tiff_tile_bomb":
            data, readable = job(input_uri=tiff)
        elif kind == "webp_lossless_bomb":
            data, readable = job(input_uri=webp)
        elif kind == "progressive_scan_bomb":
            data, readable = job(input_uri=scans)
        elif kind == "param_out_of_range":
            data, readable = job(input_uri=uris[0], params={"scale": "1000"})
        elif kind == "param_not_a_number":
            data, readable = job(input_uri=uris[0], params={"scale": "abc"})
        elif kind == "param_for_triton":
            data, readable = job(input_uri=uris[0], params={"sequence_id": "7", "traceparent": FORGED_TRACEPARENT})
        elif kind == "version_flood":
            data, readable = job(input_uri=uris[0], version=str(100_000_000 + i))
        elif kind == "huge_error_text":
            data, readable = invalid(input_uri=uris[0], output_format="x" * (limit // 2))
        elif kind == "oversized_message":
            data, readable = json.dumps({"jobId": job_id, "model": model, "pad": "x" * limit}).encode(), None
        elif kind == "params_flood":
            flood = {f"k{n}": "v" for n in range(limit // 16)}
            data, readable = ImageJob(job_id=job_id, model=model, params=flood).SerializeToString(), None
        elif kind == "job_id_newline":
            data, readable = invalid(input_uri=uris[0], job_id=f"{job_id}\n")
        elif kind == "input_name_dotdot":
            data, readable = invalid(input_uri=f"gs://{bucket}/..")
        else:  # empty_message: Pub/Sub needs data or attributes, so it carries one attribute
            data, readable, attributes = b"", None, {"chaos": "empty"}
        made.append(BadMessage(kind, data, attributes, readable))
    return made
