"""The job contract: decoding JSON and binary messages, and validating what producers control."""

from __future__ import annotations

import json

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


def test_records_of_invalid_messages_go_only_under_invalid() -> None:
    # Never under the job id the message chose: it may be another job's, whose record it would take.
    assert jobs.invalid_record_ref(RULES, "m1") == GcsRef("results", "out/_invalid/m1.json")
    assert code_of(build_job("enhance", input_uri="gs://inputs/a", output_prefix="gs://results/out/_invalid")) == (
        "invalid_output"
    )


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


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("job_id", "j1\n", "invalid_job_id"),
        ("model", "enhance\n", "invalid_model"),
        ("model_version", "1\n", "invalid_version"),
    ],
)
def test_patterns_match_the_whole_value(field: str, value: str, code: str) -> None:
    # "$" also matches before a trailing newline: GCS then refuses the name and the job retries forever.
    message = build_job("enhance", input_uri="gs://inputs/a.jpg", job_id="j1")
    setattr(message, field, value)
    assert code_of(message) == code


@pytest.mark.parametrize("name", [".", "..", "a/../b", "./a", "a\nb", "a\rb", "a.jpg\n"])
def test_input_names_gcs_refuses_are_refused_first(name: str) -> None:
    assert code_of(build_job("enhance", input_uri=f"gs://inputs/{name}", job_id="j1")) == "invalid_uri"


def test_no_job_id_names_its_record_like_another_jobs_result() -> None:
    # Job "v"'s embedding is results/v.embedding.json: job "v.embedding"'s record would be the same object.
    for job_id in ("v.embedding", "v.classification", "v.DETECTIONS", "v.image"):
        assert code_of(build_job("enhance", input_uri="gs://inputs/a.jpg", job_id=job_id)) == "invalid_job_id"
    assert jobs.validate(build_job("enhance", input_uri="gs://inputs/a.jpg", job_id="v.embedded"), RULES)


def test_a_message_larger_than_any_job_is_refused_before_parsing() -> None:
    limit = jobs.max_message_bytes(RULES.max_inline_bytes)
    unparsable = b"{" + b" " * limit  # parsing would fail: the size check comes first
    with pytest.raises(PermanentJobError) as caught:
        jobs.decode_message(unparsable, {}, limit)
    assert caught.value.code == "too_large"
    # The largest legal job fits, with every other field at its limit.
    inline_max = 2 * 1024 * 1024
    params = {f"k{i:03d}".ljust(256, "k"): "v" * 256 for i in range(jobs.MAX_PARAMS)}
    largest = build_job(
        "enhance",
        input_bytes=b"\xff" * inline_max,
        job_id="j" * 128,
        params=params,
        output_prefix="gs://results/" + "p" * 500,
    )
    assert len(encode_job(largest)) <= jobs.max_message_bytes(inline_max)


def test_error_texts_are_short_and_printable_whatever_the_message_held() -> None:
    # A 2 MB field quoted in an error would become a 10 MB record, too large for the results topic.
    huge = encode_job(build_job("enhance", input_uri="gs://inputs/a.jpg", job_id="j1")).replace(
        b'"model": "enhance"', b'"model": ' + b'"\\u0000' + b"x" * 500_000 + b'"'
    )
    with pytest.raises(PermanentJobError) as caught:
        jobs.validate(jobs.decode_message(huge, {}), RULES)
    assert len(caught.value.message) <= 300
    assert "\x00" not in caught.value.message and caught.value.message.isprintable()


def test_a_jobs_fingerprint_is_what_it_asks_for() -> None:
    def fingerprint(**options: object) -> str:
        base: dict[str, object] = {"input_uri": "gs://inputs/a.jpg", "job_id": "j1"}
        return jobs.fingerprint(jobs.validate(build_job("enhance", **{**base, **options}), RULES))  # type: ignore[arg-type]

    same = fingerprint()
    assert fingerprint(priority="high", timeout_s=30) == same  # how urgently is not what
    differs = [
        fingerprint(input_uri="gs://inputs/b.jpg"),
        fingerprint(version="2"),
        fingerprint(output_format="png"),
        fingerprint(params={"preprocess": "server"}),
        fingerprint(output_prefix="gs://other-results/p"),
        jobs.fingerprint(jobs.validate(build_job("upscale", input_uri="gs://inputs/a.jpg", job_id="j1"), RULES)),
        fingerprint(input_uri="", input_bytes=b"x"),
    ]
    assert same not in differs and len(set(differs)) == len(differs)


def test_a_message_of_more_members_than_any_job_is_refused_before_it_is_built() -> None:
    # Within the size limit, 150,000 params took json_format 1.2 s and upb 0.66 s, on the event loop.
    flood = {f"k{i}": "v" for i in range(150_000)}
    as_json = json.dumps({"jobId": "j1", "model": "enhance", "params": flood}).encode()
    as_binary = ImageJob(job_id="j1", model="enhance", params=flood).SerializeToString()
    repeated = ImageJob(job_id="j1").SerializeToString() * 100_000
    for data, attributes in ((as_json, {}), (as_binary, {"googclient_schemaencoding": "BINARY"}), (repeated, {})):
        with pytest.raises(PermanentJobError) as caught:
            jobs.decode_message(data, attributes, len(data))
        assert caught.value.code == "invalid_message"
    # The largest legal job, its params' values full of separators, in either encoding.
    params = {f"k{i:03d}:,".ljust(256, ","): ":," * 128 for i in range(jobs.MAX_PARAMS)}
    largest = build_job("enhance", input_bytes=b"\xff" * 2 * 1024 * 1024, job_id="j1", params=params)
    assert jobs.decode_message(encode_job(largest), {}) == largest
    binary = largest.SerializeToString()
    assert jobs.decode_message(binary, {"googclient_schemaencoding": "BINARY"}) == largest
