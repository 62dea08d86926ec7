"""The worker's one typed settings object, read from ``TRITONQ_*`` environment variables.

Every knob lives here, with its unit in its name and its default and meaning in
its description; the README's settings table is generated from this class
(``tritonq settings --markdown``) and a test keeps the two in step. Settings are
validated once, at start, and frozen afterwards.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Where the container's CPU limit is: cgroup v2's ``cpu.max``, else cgroup v1's CFS quota and period.
CGROUP_ROOT = Path("/sys/fs/cgroup")

CsvList = Annotated[tuple[str, ...], NoDecode]
CsvInts = Annotated[tuple[int, ...], NoDecode]


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(BaseSettings):
    """What the worker needs to know; one field per ``TRITONQ_<FIELD>`` variable."""

    model_config = SettingsConfigDict(env_prefix="TRITONQ_", frozen=True, extra="ignore")

    # Where jobs come from and results go.
    project: str = Field("local-project", description="Google Cloud project of the topic and subscription.")
    topic: str = Field("tritonq-jobs", description="Pub/Sub topic jobs are published to (`tritonq publish`).")
    subscription: str = Field("tritonq-jobs-worker", description="Pub/Sub subscription the worker pulls.")
    dead_letter_topic: str = Field(
        "tritonq-jobs-dead-letter",
        description="Dead-letter topic set on subscriptions the project creates.",
    )
    max_delivery_attempts: int = Field(
        5, ge=5, le=100, description="Deliveries before Pub/Sub dead-letters a message (5 to 100)."
    )
    results_topic: str = Field(
        "", description="If set, every finished job's `JobResult` is published here before the ack."
    )
    input_bucket: str = Field("tritonq-inputs", description="Bucket `tritonq publish` uploads local images to.")
    output_bucket: str = Field("tritonq-results", description="Bucket results are written to by default.")
    output_prefix: str = Field("results", description="Object prefix of results when a job names none.")
    allowed_input_buckets: CsvList = Field(
        (), description="Comma-separated buckets inputs may be read from; empty means only `input_bucket`."
    )
    allowed_output_buckets: CsvList = Field(
        (), description="Comma-separated buckets results may be written to; empty means only `output_bucket`."
    )

    # Triton.
    triton_url: str = Field("localhost:8001", description="Triton gRPC endpoint, `host:port`.")
    triton_metrics_url: str = Field(
        "http://localhost:8002/metrics", description="Triton's Prometheus endpoint (used by `tritonq bench`)."
    )
    triton_mode: Literal["stream", "unary"] = Field(
        "stream",
        description="`stream`: long-lived gRPC streams, one per model and priority; `unary`: one `ModelInfer` call "
        "per request. Both multiplex on one HTTP/2 connection; streams are at least as fast, unary calls cost "
        "less worker CPU (README Performance).",
    )
    shared_memory: Literal["auto", "off"] = Field(
        "auto",
        description="`auto`: pass tensors through system shared memory when Triton can map the worker's regions "
        "(same pod or host, shared `/dev/shm`), else in the gRPC messages; `off`: always in the messages.",
    )
    shared_memory_max_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="Most bytes of shared-memory regions the worker keeps registered."
    )
    infer_timeout_s: float = Field(60.0, gt=0, description="Deadline of one inference request, in seconds.")
    routes: str = Field(
        "",
        description="Weighted version splits, `model=version:weight,...;model2=...`, e.g. `enhance=1:90,2:10`. "
        "Jobs naming no version are routed by a hash of their `job_id`.",
    )

    # Flow control and concurrency.
    max_messages: int = Field(64, ge=1, description="Pub/Sub flow control: messages held at once.")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Pub/Sub flow control: message bytes held at once.")
    max_lease_duration_s: float = Field(
        600.0, gt=30, description="Longest a message's lease is extended while its job runs, in seconds."
    )
    max_in_flight: int = Field(64, ge=1, description="Jobs processed concurrently by the pipeline.")
    pubsub_give_up_s: float = Field(
        300.0,
        gt=0,
        description="How long the subscription may keep failing with errors retrying cannot mend "
        "(PERMISSION_DENIED while an IAM grant propagates, NOT_FOUND, UNAUTHENTICATED) before `tritonq run` exits "
        "non-zero so that Kubernetes restarts it, in seconds; the worker subscribes again with backoff meanwhile.",
    )
    shape_buckets_px: CsvInts = Field(
        (32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048),
        description="Image sides are padded up to one of these (comma-separated, px), so images of many sizes "
        "share Triton batches; outputs are cropped back. Empty disables padding.",
    )
    triton_queue_batches: int = Field(
        2,
        ge=1,
        description="Requests one model may have in Triton at once, in multiples of its `max_batch_size`: "
        "enough for full batches, few enough that the worker can group the rest by shape.",
    )
    preprocess_threads: int = Field(
        0,
        ge=0,
        description="Threads for image decode/encode; 0 means one per CPU the container may use (its cgroup CPU "
        "limit, rounded up, else the CPUs it may run on).",
    )
    max_pixels_in_flight: int = Field(
        300_000_000,
        ge=1,
        description="Pixels (decoded inputs plus image outputs) the jobs in flight may hold at once; a job that "
        "would pass it waits, so memory stays bounded whatever the images' sizes (measured: about 4.5 bytes of "
        "worker memory per pixel). One job always runs, however large.",
    )
    inline_max_pixels: int = Field(
        65_536,
        ge=0,
        description="Images of at most this many pixels are decoded and encoded on the event loop, larger ones in "
        "the thread pool: a hand-off to a thread costs more CPU than small image work (see README Performance). "
        "0 sends all to threads.",
    )
    inline_max_bytes: int = Field(
        64 * 1024,
        ge=0,
        description="Images of more encoded bytes than this go to the thread pool whatever their pixel count: a "
        "small image can still be costly to decode (many scans, heavy compression), and the event loop serves "
        "every job and probe.",
    )

    # Retries and shutdown.
    retry_attempts: int = Field(3, ge=1, description="Tries of a step that fails transiently before the job is nacked.")
    retry_base_s: float = Field(0.2, gt=0, description="First retry backoff in seconds; doubles each try, with jitter.")
    shutdown_grace_s: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM, how long in-flight jobs may take to finish before they are nacked.",
    )

    # Input limits (the security boundary).
    max_input_bytes: int = Field(25 * 1024 * 1024, ge=1, description="Largest input object read, in bytes.")
    max_inline_bytes: int = Field(
        2 * 1024 * 1024, ge=1, description="Largest inline image carried in the message itself, in bytes."
    )
    max_input_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Largest decoded image, width x height; bigger is rejected, never decoded.",
    )
    max_decode_s: float = Field(
        20.0,
        gt=0,
        description="Seconds one image decode may take; past it the job fails (`decode_timeout`) instead of "
        "holding a thread.",
    )

    # Operations.
    http_port: int = Field(8080, ge=0, le=65535, description="Port of `/metrics`, `/healthz` and `/readyz`.")
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: str = Field("auto", description="`json`, `console`, or `auto` (console on a TTY, JSON otherwise).")
    log_success_per_s: float = Field(
        1.0, ge=0, description="Most `job_succeeded` lines logged per second; failures are always logged."
    )

    _split_lists = field_validator(
        "allowed_input_buckets", "allowed_output_buckets", "shape_buckets_px", mode="before"
    )(_split_csv)

    @field_validator("shape_buckets_px")
    @classmethod
    def _ascending(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(b <= 0 for b in value) or list(value) != sorted(set(value)):
            raise ValueError("shape_buckets_px must be ascending positive sizes")
        return value

    @field_validator("log_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in ("auto", "json", "console"):
            raise ValueError("log_format must be auto, json or console")
        return value

    @model_validator(mode="after")
    def _routes_parse(self) -> Settings:
        from worker.routing import parse_routes

        parse_routes(self.routes)
        return self

    @property
    def input_buckets(self) -> frozenset[str]:
        """Buckets inputs may come from."""
        return frozenset(self.allowed_input_buckets or (self.input_bucket,))

    @property
    def output_buckets(self) -> frozenset[str]:
        """Buckets results may go to."""
        return frozenset(self.allowed_output_buckets or (self.output_bucket,))

    @property
    def subscription_path(self) -> str:
        return _path(self.project, "subscriptions", self.subscription)

    @property
    def topic_path(self) -> str:
        return _path(self.project, "topics", self.topic)

    @property
    def results_topic_path(self) -> str:
        return _path(self.project, "topics", self.results_topic) if self.results_topic else ""

    @property
    def thread_count(self) -> int:
        return self.preprocess_threads or available_cpus()


def cgroup_cpu_limit(cpu_max: str | None, cfs_quota: str | None = None, cfs_period: str | None = None) -> float | None:
    """CPUs a cgroup may use, from v2's ``cpu.max`` (``"200000 100000"``, ``"max 100000"``) or v1's CFS
    quota and period; ``None`` when unlimited or unreadable."""
    quota, period = [*cpu_max.split(), ""][:2] if cpu_max else (cfs_quota or "", cfs_period or "")
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None  # "max", or nothing to read
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its cgroup's limit rounded up, at most the CPUs it may run on.

    ``os.cpu_count()`` counts the node's cores: in a pod limited to 2 CPUs on a 64-core node it
    would start 64 threads, each holding an image's pixels.
    """

    def read(path: Path) -> str | None:
        try:
            return path.read_text().strip()
        except OSError:
            return None

    limit = cgroup_cpu_limit(
        read(root / "cpu.max"), read(root / "cpu" / "cpu.cfs_quota_us"), read(root / "cpu" / "cpu.cfs_period_us")
    )
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, math.ceil(limit))) if limit is not None else max(1, usable)


def _path(project: str, kind: str, name: str) -> str:
    return name if name.startswith("projects/") else f"projects/{project}/{kind}/{name}"


def settings_markdown() -> str:
    """The README's settings table."""
    lines = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(str(item) for item in default)
        lines.append(f"| `TRITONQ_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(lines) + "\n"
