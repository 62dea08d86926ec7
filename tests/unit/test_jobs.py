"""The job contract: decoding JSON and binary messages, and validating what producers control."""

from __future__ import annotations

import pytest

from worker import jobs
from worker.client import build_job, encode_job
from worker.errors import PermanentJobError
from worker.jobs import GcsRef, ImageJob, JobRules

RULES = JobRules(
    input_buckets=frozenset({"inputs"}),
    output_buckets=frozenset({"results", "other-results"}),
    default_output=GcsRef("results", "out"),
    max_inline_bytes=100,
)


def code_of(message: ImageJob) -> str:
    with pytest.raises(PermanentJobError) as caught:
        jobs.validate(message, RULES)
    return caught.value.code


def test_json_and_binary_decode_to_the_same_job() -> None:
    job = build_job("enhance", input_uri="gs://inputs/a.jpg", job_id="j1", params={"scale": "2"})
    from_json = jobs.decode_message(encode_job(job), {})
    from_binary = jobs.decode_message(job.SerializeToString(), {})
    assert from_json == from_binary == job


def test_the_schema_encoding_attribute_decides_the_format() -> None:
    job = build_job("enhance", input_uri="gs://inputs/a.jpg", job_id="j1")
    assert jobs.decode_message(encode_job(job), {"googclient_schemaencoding": "JSON"}) == job
    with pytest.raises(PermanentJobError):
        jobs.decode_message(encode_job(job), {"googclient_schemaencoding": "BINARY"})


@pytest.mark.parametrize(
    "data",
    [b"", b"{not json", b'{"jobId": 5, "model": []}', b'{"unknownField": 1}', b"\x00\x01\x02garbage", b"[1,2]"],
)
def test_malformed_messages_are_permanent_errors(data: bytes) -> None:
    with pytest.raises(PermanentJobError) as caught:
        jobs.decode_message(data, {})
    assert caught.value.code == "invalid_message"


def test_a_valid_job_keeps_its_fields() -> None:
    job = jobs.validate(
        build_job(
            "upscale", input_uri="gs://inputs/dir/a.jpg", job_id="a-1.b_2", params={"scale": "4"}, output_format="JPG"
        ),
        RULES,
    )
    assert job.input_ref == GcsRef("inputs", "dir/a.jpg")
    assert job.output == GcsRef("results", "out")
    assert job.output_format == "jpeg"
    assert job.params == {"scale": "4"}


@pytest.mark.parametrize("job_id", ["", "../etc", "a/b", "a..b", "/abs", "x" * 129, "-lead", "sp ace", "ünï"])
def test_unsafe_job_ids_are_refused(job_id: str) -> None:
    assert code_of(ImageJob(job_id=job_id, model="enhance", input_uri="gs://inputs/a.jpg")) == "invalid_job_id"


@pytest.mark.parametrize(
    ("prefix", "code"),
    [
        ("gs://elsewhere/p", "bucket_not_allowed"),
        ("gs://results/../x", "invalid_output"),
        ("gs://results/a//b/../c", "invalid_output"),
        ("s3://results/p", "invalid_uri"),
        ("gs://results/" + "a" * 600, "invalid_output"),
    ],
)
def test_output_prefixes_are_checked(prefix: str, code: str) -> None:
    assert code_of(build_job("enhance", input_uri="gs://inputs/a.jpg", job_id="j", output_prefix=prefix)) == code


def test_an_allowed_output_prefix_is_used() -> None:
    job = jobs.validate(
        build_job("enhance", input_uri="gs://inputs/a.jpg", job_id="j", output_prefix="gs://other-results/x/y/"), RULES
    )
    assert job.output == GcsRef("other-results", "x/y")


def test_inputs_outside_the_allowlist_are_refused() -> None:
    assert code_of(build_job("enhance", input_uri="gs://secrets/a.jpg", job_id="j")) == "bucket_not_allowed"
    assert code_of(build_job("enhance", input_uri="gs://inputs", job_id="j")) == "invalid_uri"


def test_inline_payloads_are_capped() -> None:
    assert code_of(build_job("enhance", input_bytes=b"x" * 101, job_id="j")) == "too_large"
    assert jobs.validate(build_job("enhance", input_bytes=b"x" * 100, job_id="j"), RULES).input_bytes == b"x" * 100


def test_other_fields_are_checked() -> None:
    assert code_of(ImageJob(job_id="j", model="enhance")) == "missing_input"
    assert code_of(ImageJob(job_id="j", model="../m", input_uri="gs://inputs/a")) == "invalid_model"
    assert code_of(ImageJob(job_id="j", model="m", model_version="v2", input_uri="gs://inputs/a")) == "invalid_version"
    assert code_of(ImageJob(job_id="j", model="m", output_format="gif", input_uri="gs://inputs/a")) == "invalid_format"


def test_error_records_go_beside_the_result_or_under_invalid() -> None:
    good_id = ImageJob(job_id="j1", model="m", output_prefix="gs://other-results/p")
    assert jobs.record_location(good_id, RULES, "m1") == GcsRef("other-results", "p/j1.json")
    bad_prefix = ImageJob(job_id="j1", output_prefix="gs://evil/p")
    assert jobs.record_location(bad_prefix, RULES, "m1") == GcsRef("results", "out/j1.json")
    bad_id = ImageJob(job_id="../j1")
    assert jobs.record_location(bad_id, RULES, "m1") == GcsRef("results", "out/_invalid/m1.json")
    assert jobs.record_location(None, RULES, "m2") == GcsRef("results", "out/_invalid/m2.json")


def test_deadlines_and_priorities() -> None:
    job = jobs.validate(
        ImageJob(job_id="j", model="m", input_uri="gs://inputs/a", deadline="2030-01-01T00:00:00Z", priority="HIGH"),
        RULES,
    )
    assert job.deadline == 1893456000.0
    assert job.priority == 1
    relative = jobs.validate(ImageJob(job_id="j", model="m", input_uri="gs://inputs/a", timeout_s=30), RULES, 1000.0)
    assert relative.deadline == 1030.0
    assert relative.expired(1030.0)
    assert not relative.expired(1029.9)
    assert relative.priority == 0  # the model's default level
    assert (
        code_of(ImageJob(job_id="j", model="m", input_uri="gs://inputs/a", deadline="tomorrow")) == "invalid_deadline"
    )
    assert (
        code_of(ImageJob(job_id="j", model="m", input_uri="gs://inputs/a", deadline="2030-01-01T00:00"))
        == "invalid_deadline"
    )
    assert code_of(ImageJob(job_id="j", model="m", input_uri="gs://inputs/a", priority="urgent")) == "invalid_priority"


def test_trace_context_is_taken_only_when_well_formed() -> None:
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert jobs.traceparent_of({"traceparent": good}) == good
    assert jobs.traceparent_of({"traceparent": "00-xyz"}) == ""
    assert jobs.traceparent_of({}) == ""
