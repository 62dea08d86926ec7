"""Structured logs (structlog, in the shape Cloud Logging reads) and the worker's Prometheus metrics.

Logs are one JSON object per line with ``severity``, ``message`` and ``time``,
so Cloud Logging on GKE parses them without an agent config; on a TTY they are
human-readable instead. A job's fields (``job_id``, ``message_id``, ``model``,
``version``, ``delivery_attempt``) are bound with structlog's contextvars for
every line it logs. Metric names start with ``tritonq_`` and are documented in
the README; Triton exports its own on its metrics port. Label values come
from the worker, never straight from a message: a model or version the
catalog does not serve is ``unknown`` (``Catalog.label``, ``Catalog.version_label``),
so no publisher can grow the number of series.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from prometheus_client import Counter, Gauge, Histogram

T = TypeVar("T")

#: Buckets in seconds for image work: a small JPEG preprocesses in about a millisecond, a
#: 4x upscale of a large photo can take tens of seconds on a busy GPU.
STAGE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

JOBS = Counter(
    "tritonq_jobs",
    "Jobs finished, by model, version served and outcome (succeeded, failed_permanent, retried, nacked).",
    ["model", "version", "outcome"],
)
FAILURES = Counter("tritonq_failures", "Jobs that failed, by reason code.", ["reason"])
STAGE_SECONDS = Histogram(
    "tritonq_stage_seconds",
    "Time per pipeline stage (fetch, preprocess, infer, postprocess, write).",
    ["stage", "model"],
    buckets=STAGE_BUCKETS_S,
)
JOB_LATENCY_SECONDS = Histogram(
    "tritonq_job_latency_seconds",
    "Publish time to ack, per model.",
    ["model"],
    buckets=LATENCY_BUCKETS_S,
)
IN_FLIGHT = Gauge("tritonq_jobs_in_flight", "Jobs being processed by the pipeline now.")
MESSAGES_HELD = Gauge("tritonq_messages_held", "Messages held by the consumer (received, not yet acked or nacked).")
OLDEST_MESSAGE_AGE = Gauge("tritonq_oldest_message_age_seconds", "Age since publish of the oldest message in progress.")
PUBSUB_REQUEST_ERRORS = Counter(
    "tritonq_pubsub_request_errors",
    "Pub/Sub ack, nack and lease requests that failed (by request); given up after retries, the message comes back.",
    ["request"],
)
TRITON_RECONNECTS = Counter(
    "tritonq_triton_stream_reconnects", "Times a Triton stream broke and was reopened (TRITONQ_TRITON_MODE=stream)."
)
MODEL_READY = Gauge(
    "tritonq_model_ready",
    "1 when Triton serves the model (some version READY), 0 when it is loading or failed to load.",
    ["model"],
)
TRITON_REQUESTS = Counter(
    "tritonq_triton_requests",
    "Inference requests answered, by how their tensors travelled: shared_memory (a region) or message (gRPC payload).",
    ["transport"],
)
TRITON_IN_FLIGHT = Gauge("tritonq_triton_requests_in_flight", "Inference requests sent and not yet answered.")
BYTES_READ = Counter("tritonq_bytes_read", "Input bytes read from GCS or inline payloads.")
BYTES_WRITTEN = Counter("tritonq_bytes_written", "Result and record bytes written to GCS.")

_SEVERITY = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "error": "ERROR", "critical": "CRITICAL"}


def _cloud_logging_fields(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["severity"] = _SEVERITY.get(method, method.upper())
    event["message"] = event.pop("event", "")
    return event


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Set up structlog once per process: JSON for machines, colours for people."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        structlog.processors.format_exc_info,
    ]
    if console:
        processors.append(structlog.dev.ConsoleRenderer())
    else:
        processors += [
            structlog.processors.dict_tracebacks,
            _drop_level,
            _cloud_logging_fields,
            structlog.processors.JSONRenderer(),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _drop_level(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    event.pop("level", None)
    return event


def trace_fields(traceparent: str, project: str) -> dict[str, str]:
    """The fields through which Cloud Logging links a log line to its trace (none without a traceparent)."""
    if not traceparent:
        return {}
    _, trace_id, span_id, _ = traceparent.split("-")
    return {
        "logging.googleapis.com/trace": f"projects/{project}/traces/{trace_id}",
        "logging.googleapis.com/spanId": span_id,
    }


@dataclass
class StageTimer:
    """Milliseconds per stage of one job, observed into the stage histogram as they end."""

    model: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)

    async def stage(self, name: str, work: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            return await work
        finally:
            elapsed = time.perf_counter() - start
            self.timings_ms[name] = round(elapsed * 1000, 3)
            STAGE_SECONDS.labels(name, self.model or "unknown").observe(elapsed)


class RateLimiter:
    """At most ``per_s`` events a second (token bucket): success lines must not flood the logs."""

    def __init__(self, per_s: float) -> None:
        self._per_s = per_s
        self._tokens = per_s
        self._last = time.monotonic()

    def allow(self) -> bool:
        if self._per_s <= 0:
            return False
        now = time.monotonic()
        self._tokens = min(max(1.0, self._per_s), self._tokens + (now - self._last) * self._per_s)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
