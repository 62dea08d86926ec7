"""The job contract: decode a Pub/Sub message into a validated ``Job``, or raise ``PermanentJobError``.

Messages carry an ``ImageJob`` (``protos/job.proto``) in protobuf JSON, the
default and what a person types, or in binary protobuf; the Pub/Sub schema
attribute ``googclient_schemaencoding`` settles which when present. Everything
a producer controls is checked here, once: the ``job_id`` (it names objects,
so no ``..``, no slashes, a short safe charset), the model name, the input's
bucket against the allowlist, the output prefix, the inline payload's size,
the output format. Pure functions; no I/O.

Everything here assumes the publisher is hostile: a message larger than an
inline image could make is refused before it is parsed, patterns match the
whole value (``$`` would let a trailing newline through), object names obey
GCS's rules (no CR or LF, no ``.`` or ``..``), and a job is identified by its
content (``fingerprint``), not by the id its publisher chose, so a second job
reusing an id cannot take over the first one's result.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from worker.errors import PermanentJobError
from worker.models import KINDS
from worker.proto.job_pb2 import ImageJob, JobResult

__all__ = [
    "GcsRef",
    "ImageJob",
    "Job",
    "JobResult",
    "JobRules",
    "decode_message",
    "fingerprint",
    "parse_gs_uri",
    "validate",
]

# Matched with ``fullmatch``: ``$`` also matches before a trailing newline.
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
VERSION_RE = re.compile(r"[0-9]{1,9}")
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]")
PREFIX_SEGMENT_RE = re.compile(r"[A-Za-z0-9_.=-]{1,128}")
#: Where results go in the default output bucket when a job names no ``outputPrefix``.
RESULTS_PREFIX = "results"
#: The folder of records of messages that are not valid jobs (keyed by message id, never by a job id).
INVALID_FOLDER = "_invalid"
#: Results of vector models are named ``{job_id}.{kind}.json`` beside ``{job_id}.json`` records: a job id
#: ending in ``.{kind}`` would name its record after another job's result.
RESERVED_ID_SUFFIXES = tuple(f".{kind}" for kind in sorted(KINDS))
#: Bytes a message may carry beyond its base64-encoded inline image: every other field at its limit.
MESSAGE_MARGIN_BYTES = 64 * 1024
#: Fields a binary message may hold at its top level: each of its own fields, and one per param. Counted
#: before parsing, because upb parses a map of 150,000 entries in 0.66 s holding the GIL.
MAX_BINARY_FIELDS = 64
#: Commas and colons a JSON message may hold: its members, and what params' values may carry. Counted
#: before parsing, so ``json.loads`` never builds an object of hundreds of thousands of members.
MAX_JSON_SEPARATORS = 20_000
#: The ``params`` field's number in ``ImageJob`` (each map entry is one field on the wire).
_PARAMS_FIELD = 7
#: Object names are at most 1024 bytes in GCS; leave room for the job id and extension.
MAX_PREFIX_CHARS = 512
MAX_PARAMS = 32
MAX_PARAM_CHARS = 256
TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
#: Job priority names to Triton priority levels (1 is served first; the image
#: models declare ``priority_levels: 3`` with ``default_priority_level: 2``).
PRIORITIES = {"high": 1, "normal": 2, "low": 3}
OUTPUT_FORMATS = frozenset({"png", "jpeg", "webp", "json", "npy"})
FORMAT_ALIASES = {"jpg": "jpeg"}


@dataclass(frozen=True)
class GcsRef:
    """A bucket and an object name (or prefix)."""

    bucket: str
    name: str

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"


@dataclass(frozen=True)
class JobRules:
    """The limits and allowlists a job is validated against (from ``Settings``)."""

    input_buckets: frozenset[str]
    output_buckets: frozenset[str]
    default_output: GcsRef
    max_inline_bytes: int


@dataclass(frozen=True)
class Job:
    """A validated job, ready for the pipeline."""

    job_id: str
    model: str
    requested_version: str
    input_ref: GcsRef | None
    input_bytes: bytes | None
    output: GcsRef
    params: Mapping[str, str] = field(default_factory=dict)
    output_format: str = ""
    #: Seconds since the epoch after which the job is worthless; ``None`` if it has no deadline.
    deadline: float | None = None
    #: Triton priority level; 0 leaves the model's default.
    priority: int = 0

    def remaining_s(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


def max_message_bytes(max_inline_bytes: int) -> int:
    """The largest message worth parsing: a JSON job carrying the largest inline image (base64), and the rest."""
    return -(-max_inline_bytes // 3) * 4 + MESSAGE_MARGIN_BYTES


def decode_message(data: bytes, attributes: Mapping[str, str], max_bytes: int | None = None) -> ImageJob:
    """Parse message bytes into an ``ImageJob`` proto; malformed input is a ``PermanentJobError``.

    A message over ``max_bytes`` is refused unread: parsing costs time on the event loop, and the
    job it holds would be refused anyway.
    """
    if not data:
        raise PermanentJobError("invalid_message", "message is empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise PermanentJobError("too_large", f"message is {len(data)} bytes, limit {max_bytes}")
    encoding = attributes.get("googclient_schemaencoding", "").upper()
    job = ImageJob()
    if encoding == "JSON" or (encoding != "BINARY" and data.lstrip()[:1] == b"{"):
        if data.count(b",") + data.count(b":") > MAX_JSON_SEPARATORS:
            raise PermanentJobError("invalid_message", "message has more JSON members than any job has")
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise PermanentJobError("invalid_message", f"not a valid ImageJob in JSON: {exc}") from exc
        params = document.get("params") if isinstance(document, dict) else None
        if isinstance(params, dict) and len(params) > MAX_PARAMS:
            # Counted before the proto is built: json_format walks a map in Python, a second per 100,000 keys.
            raise PermanentJobError("invalid_param", f"{len(params)} params, at most {MAX_PARAMS}")
        try:
            json_format.ParseDict(document, job)
        except (json_format.ParseError, RecursionError) as exc:
            raise PermanentJobError("invalid_message", f"not a valid ImageJob in JSON: {exc}") from exc
        return job
    _check_wire_fields(data)
    try:
        job.ParseFromString(data)
    except DecodeError as exc:
        raise PermanentJobError("invalid_message", "neither JSON nor a binary ImageJob") from exc
    if not job.job_id and not job.model:
        # Arbitrary bytes often parse as a protobuf with only unknown fields.
        raise PermanentJobError("invalid_message", "neither JSON nor a binary ImageJob")
    return job


def _check_wire_fields(data: bytes) -> None:
    """Walk a binary message's top-level fields (never into them) and refuse one with too many, or too many params.

    At most ``MAX_BINARY_FIELDS`` steps whatever the message holds; malformed wire data is left for the parser.
    """
    position, fields, params = 0, 0, 0
    while position < len(data):
        fields += 1
        if fields > MAX_BINARY_FIELDS or params > MAX_PARAMS:
            raise PermanentJobError("invalid_message", f"message has more fields than any job ({MAX_PARAMS} params)")
        key, position = _varint(data, position)
        wire_type, number = key & 7, key >> 3
        params += number == _PARAMS_FIELD
        if wire_type == 0:
            _, position = _varint(data, position)
        elif wire_type == 2:
            length, position = _varint(data, position)
            position += length
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        else:
            return  # groups or garbage: the parser refuses them


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(data) and shift < 64:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
        shift += 7
    return value, len(data)


def parse_deadline(text: str) -> float:
    """An RFC 3339 time (``Z`` or an offset required) as seconds since the epoch."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise PermanentJobError("invalid_deadline", f"deadline {text!r} is not an RFC 3339 time") from exc
    if moment.tzinfo is None:
        raise PermanentJobError("invalid_deadline", f"deadline {text!r} has no time zone")
    return moment.timestamp()


def traceparent_of(attributes: Mapping[str, str]) -> str:
    """The message's W3C ``traceparent`` attribute if well-formed, else ``""``."""
    value = attributes.get("traceparent", "").strip().lower()
    return value if TRACEPARENT_RE.fullmatch(value) else ""


def valid_job_id(job_id: str) -> bool:
    return (
        bool(JOB_ID_RE.fullmatch(job_id)) and ".." not in job_id and not job_id.lower().endswith(RESERVED_ID_SUFFIXES)
    )


def valid_object_name(name: str) -> bool:
    """GCS's own rules, checked before GCS sees the name: no CR or LF, no ``.`` or ``..`` (nor as a segment)."""
    return "\r" not in name and "\n" not in name and not any(part in (".", "..") for part in name.split("/"))


def parse_gs_uri(uri: str) -> GcsRef:
    """Split ``gs://bucket/name``; the name may be empty (a bucket-level prefix)."""
    if not uri.startswith("gs://"):
        raise PermanentJobError("invalid_uri", f"{uri!r} is not a gs:// URI")
    bucket, _, name = uri[len("gs://") :].partition("/")
    if not BUCKET_RE.fullmatch(bucket):
        raise PermanentJobError("invalid_uri", f"{uri!r} names no valid bucket")
    return GcsRef(bucket, name)


def _check_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    if len(prefix) > MAX_PREFIX_CHARS:
        raise PermanentJobError("invalid_output", f"output prefix longer than {MAX_PREFIX_CHARS} characters")
    if prefix:
        for segment in prefix.split("/"):
            if segment in (".", "..", INVALID_FOLDER) or not PREFIX_SEGMENT_RE.fullmatch(segment):
                raise PermanentJobError("invalid_output", f"output prefix segment {segment!r} is not allowed")
    return prefix


def output_of(message: ImageJob, rules: JobRules) -> GcsRef:
    """Where a job's result (and its record) go; raises if the job's own choice is not allowed."""
    if not message.output_prefix:
        return rules.default_output
    ref = parse_gs_uri(message.output_prefix)
    if ref.bucket not in rules.output_buckets:
        raise PermanentJobError("bucket_not_allowed", f"output bucket {ref.bucket!r} is not on the allowlist")
    return GcsRef(ref.bucket, _check_prefix(ref.name))


def validate(message: ImageJob, rules: JobRules, publish_time: float = 0.0) -> Job:
    """Check every field a producer controls; return the ``Job`` or raise ``PermanentJobError``.

    ``publish_time`` (seconds since the epoch) anchors a relative ``timeout_s``.
    """
    if not valid_job_id(message.job_id):
        raise PermanentJobError(
            "invalid_job_id",
            "job_id must be 1-128 characters of [A-Za-z0-9_.-], start alphanumeric, no '..', and not end in "
            f"{', '.join(RESERVED_ID_SUFFIXES)}",
        )
    if not MODEL_RE.fullmatch(message.model):
        raise PermanentJobError("invalid_model", f"model {message.model!r} is not a valid model name")
    if message.model_version and not VERSION_RE.fullmatch(message.model_version):
        raise PermanentJobError("invalid_version", f"model_version {message.model_version!r} is not a number")
    output = output_of(message, rules)

    input_ref: GcsRef | None = None
    input_bytes: bytes | None = None
    which = message.WhichOneof("input")
    if which == "input_uri":
        input_ref = parse_gs_uri(message.input_uri)
        if not input_ref.name:
            raise PermanentJobError("invalid_uri", f"{message.input_uri!r} names no object")
        if not valid_object_name(input_ref.name):
            raise PermanentJobError("invalid_uri", f"{message.input_uri!r} is not a valid object name")
        if input_ref.bucket not in rules.input_buckets:
            raise PermanentJobError("bucket_not_allowed", f"input bucket {input_ref.bucket!r} is not on the allowlist")
    elif which == "input_bytes":
        if len(message.input_bytes) > rules.max_inline_bytes:
            raise PermanentJobError(
                "too_large",
                f"inline input is {len(message.input_bytes)} bytes, limit {rules.max_inline_bytes}",
            )
        input_bytes = message.input_bytes
    else:
        raise PermanentJobError("missing_input", "job has neither input_uri nor input_bytes")

    fmt = message.output_format.lower()
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt and fmt not in OUTPUT_FORMATS:
        raise PermanentJobError(
            "invalid_format",
            f"output_format {message.output_format!r} is not one of {sorted(OUTPUT_FORMATS)}",
        )
    if len(message.params) > MAX_PARAMS or any(
        len(k) > MAX_PARAM_CHARS or len(v) > MAX_PARAM_CHARS for k, v in message.params.items()
    ):
        raise PermanentJobError("invalid_param", f"at most {MAX_PARAMS} params of {MAX_PARAM_CHARS} characters")
    priority = message.priority.lower()
    if priority and priority not in PRIORITIES:
        raise PermanentJobError("invalid_priority", f"priority {message.priority!r} is not one of {sorted(PRIORITIES)}")
    deadlines = []
    if message.deadline:
        deadlines.append(parse_deadline(message.deadline))
    if message.timeout_s < 0:
        raise PermanentJobError("invalid_deadline", "timeout_s must not be negative")
    if message.timeout_s > 0:
        deadlines.append(publish_time + message.timeout_s)
    return Job(
        job_id=message.job_id,
        model=message.model,
        requested_version=message.model_version,
        input_ref=input_ref,
        input_bytes=input_bytes,
        output=output,
        params=dict(message.params),
        output_format=fmt,
        deadline=min(deadlines) if deadlines else None,
        priority=PRIORITIES.get(priority, 0),
    )


def fingerprint(job: Job) -> str:
    """What the job asks for, as a digest: two messages are the same job only if their fingerprints match.

    Model, requested version, input (its URI, or a digest of its bytes), output place and format, and
    params; not the deadline or priority, which a producer may change when it publishes a job again.
    """
    source = job.input_ref.uri if job.input_ref is not None else hashlib.sha256(job.input_bytes or b"").hexdigest()
    content = [job.model, job.requested_version, source, job.output.uri, job.output_format, sorted(job.params.items())]
    return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()[:32]


def invalid_record_ref(rules: JobRules, message_id: str) -> GcsRef:
    """Where the record of a message that is not a valid job goes: ``_invalid/{message_id}.json``.

    Never under a job id the message chose: it could be another job's.
    """
    return GcsRef(rules.default_output.bucket, join(rules.default_output.name, INVALID_FOLDER, f"{message_id}.json"))


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def result_json(result: JobResult) -> bytes:
    """A ``JobResult`` as the JSON written to GCS (field names as in the proto)."""
    return json_format.MessageToJson(result, preserving_proto_field_name=True, indent=None).encode()
