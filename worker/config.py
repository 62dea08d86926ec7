"""The worker's one typed settings object, read from ``TRITONQ_*`` environment variables.

Every knob a user sets lives here, with its unit in its name and its default and
meaning in its description; the README's settings table is generated from this
class (``tritonq settings --markdown``) and a test keeps the two in step. Settings
are validated once, at start, with a message naming the setting and what it
expects, and frozen afterwards.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Where the container's CPU limit is: cgroup v2's ``cpu.max``, else cgroup v1's CFS quota and period.
CGROUP_ROOT = Path("/sys/fs/cgroup")

#: Bytes: the largest inline image whose base64 (4/3) plus the job's other fields fits a 10 MB Pub/Sub message.
MAX_INLINE_BYTES_LIMIT = 7 * 1024 * 1024

CsvList = Annotated[tuple[str, ...], NoDecode]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


class Settings(BaseSettings):
    """What a user running the worker sets; one field per ``TRITONQ_<FIELD>`` variable.

    Internal tuning (shape buckets, retries, thread hand-off thresholds, lease and decode
    budgets) is a named constant in the module that uses it, not a setting.
    """

    model_config = SettingsConfigDict(env_prefix="TRITONQ_", frozen=True, extra="ignore")

    # Where jobs come from and results go.
    project: str = Field("local-project", description="Google Cloud project of the topic and subscription.")
    topic: str = Field(
        "tritonq-jobs",
        description="Pub/Sub topic jobs are published to (`tritonq publish`); its dead-letter topic, which "
        "`tritonq init` creates, is named `<topic>-dead-letter`.",
    )
    subscription: str = Field("tritonq-jobs-worker", description="Pub/Sub subscription the worker pulls.")
    max_delivery_attempts: int = Field(
        5,
        ge=5,
        le=100,
        description="Deliveries before Pub/Sub dead-letters a message, on subscriptions "
        "`tritonq init` creates (5 to 100).",
    )
    results_topic: str = Field(
        "", description="If set, every finished job's `JobResult` is published here before the ack."
    )
    input_bucket: str = Field("tritonq-inputs", description="Bucket `tritonq publish` uploads local images to.")
    output_bucket: str = Field(
        "tritonq-results", description="Bucket results are written to (under `results/`) when a job names none."
    )
    allowed_input_buckets: CsvList = Field(
        (), description="Comma-separated buckets inputs may be read from; empty means only `input_bucket`."
    )
    allowed_output_buckets: CsvList = Field(
        (), description="Comma-separated buckets results may be written to; empty means only `output_bucket`."
    )

    # Triton.
    triton_url: str = Field("localhost:8001", description="Triton gRPC endpoint, `host:port`.")
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
    routes: str = Field(
        "",
        description="Weighted version splits, `model=version:weight,...;model2=...`, e.g. `enhance=1:90,2:10`. "
        "Jobs naming no version are routed by a hash of their `job_id`.",
    )

    # Flow control and concurrency.
    max_messages: int = Field(64, ge=1, description="Pub/Sub flow control: messages held at once.")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Pub/Sub flow control: message bytes held at once.")
    max_in_flight: int = Field(64, ge=1, description="Jobs processed concurrently by the pipeline.")
    pubsub_give_up_s: float = Field(
        300.0,
        gt=0,
        description="How long the subscription may keep failing with errors retrying cannot mend "
        "(PERMISSION_DENIED while an IAM grant propagates, NOT_FOUND, UNAUTHENTICATED) before `tritonq run` exits "
        "non-zero so that Kubernetes restarts it, in seconds; the worker subscribes again with backoff meanwhile.",
    )
    max_pixels_in_flight: int = Field(
        300_000_000,
        ge=1,
        description="Pixels (decoded inputs plus image outputs) the jobs in flight may hold at once; a job that "
        "would pass it waits, so memory stays bounded whatever the images' sizes (README Security sizes it). "
        "One job always runs, however large.",
    )
    shutdown_grace_s: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM, how long in-flight jobs may take to finish before they are nacked.",
    )

    # Input limits (the security boundary).
    max_input_bytes: int = Field(25 * 1024 * 1024, ge=1, description="Largest input object read, in bytes.")
    max_inline_bytes: int = Field(
        2 * 1024 * 1024,
        ge=1,
        le=MAX_INLINE_BYTES_LIMIT,
        description="Largest inline image carried in the message itself, in bytes; at most 7 MiB, so that its "
        "base64 fits a Pub/Sub message (10 MB).",
    )
    max_input_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Largest decoded image, width x height; bigger is rejected, never decoded.",
    )

    # Operations.
    http_port: int = Field(8080, ge=0, le=65535, description="Port of `/metrics`, `/healthz` and `/readyz`.")
    log_level: LogLevel = Field("INFO", description="Log level: DEBUG, INFO, WARNING or ERROR (any case).")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="`json`, `console`, or `auto` (console on a TTY, JSON otherwise)."
    )

    _split_lists = field_validator("allowed_input_buckets", "allowed_output_buckets", mode="before")(_split_csv)
    _level_case = field_validator("log_level", mode="before")(_upper)

    @field_validator("project")
    @classmethod
    def _project_id(cls, value: str) -> str:
        if not value or any(c.isspace() or c == "/" for c in value):
            raise ValueError(f"{value!r} is not a project id (no spaces or slashes)")
        return value

    @field_validator("topic", "subscription", "results_topic")
    @classmethod
    def _resource_name(cls, value: str, info: ValidationInfo) -> str:
        if not value and info.field_name == "results_topic":
            return value
        parts = value.split("/")
        full = len(parts) == 4 and parts[0] == "projects" and parts[2] in ("topics", "subscriptions")
        if any(c.isspace() for c in value) or not all(parts) or not (len(parts) == 1 or full):
            raise ValueError(f"{value!r}: expected a name or projects/<project>/<topics|subscriptions>/<name>")
        return value

    @field_validator("input_bucket", "output_bucket", "allowed_input_buckets", "allowed_output_buckets")
    @classmethod
    def _bucket_names(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        for name in (value,) if isinstance(value, str) else value:
            if not name or "://" in name or "/" in name or any(c.isspace() for c in name):
                raise ValueError(f"{name!r} is not a bucket name (write `my-bucket`, not `gs://my-bucket/path`)")
        return value

    @field_validator("triton_url")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if "://" in value or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r}: expected host:port of Triton's gRPC endpoint, e.g. localhost:8001")
        return value

    @field_validator("routes")
    @classmethod
    def _routes_parse(cls, value: str) -> str:
        from worker.routing import parse_routes

        parse_routes(value)
        return value

    @model_validator(mode="after")
    def _inline_within_input(self) -> Settings:
        if self.max_inline_bytes > self.max_input_bytes:
            raise ValueError(
                f"max_inline_bytes ({self.max_inline_bytes}) exceeds max_input_bytes ({self.max_input_bytes}): "
                "inline images that large would be refused anyway"
            )
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
    def dead_letter_topic(self) -> str:
        """The jobs topic's dead-letter topic: named after it, so one setting names both."""
        return f"{self.topic.rsplit('/', 1)[-1]}-dead-letter"

    @property
    def subscription_path(self) -> str:
        return _path(self.project, "subscriptions", self.subscription)

    @property
    def topic_path(self) -> str:
        return _path(self.project, "topics", self.topic)

    @property
    def results_topic_path(self) -> str:
        return _path(self.project, "topics", self.results_topic) if self.results_topic else ""


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
