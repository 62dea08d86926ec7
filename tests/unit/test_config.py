"""Settings: environment parsing, validation, and the README table kept in step with the class."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.config import Settings, available_cpus, cgroup_cpu_limit, settings_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITONQ_MAX_MESSAGES", "7")
    monkeypatch.setenv("TRITONQ_ALLOWED_INPUT_BUCKETS", "in-a, in-b,,in-c")
    monkeypatch.setenv("TRITONQ_SUBSCRIPTION", "projects/p/subscriptions/s")
    settings = Settings()
    assert settings.max_messages == 7
    assert settings.input_buckets == frozenset({"in-a", "in-b", "in-c"})
    assert settings.output_buckets == frozenset({settings.output_bucket})
    assert settings.subscription_path == "projects/p/subscriptions/s"
    assert Settings(topic="jobs").topic_path == "projects/local-project/topics/jobs"
    assert Settings(topic="projects/p/topics/jobs").dead_letter_topic == "jobs-dead-letter"
    assert Settings(log_level="debug").log_level == "DEBUG"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TRITONQ_LOG_LEVEL", "verbose", "Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
        ("TRITONQ_LOG_FORMAT", "xml", "Input should be 'auto', 'json' or 'console'"),
        ("TRITONQ_TRITON_MODE", "grpc", "Input should be 'stream' or 'unary'"),
        ("TRITONQ_SHARED_MEMORY", "on", "Input should be 'auto' or 'off'"),
        ("TRITONQ_MAX_MESSAGES", "0", "greater than or equal to 1"),
        ("TRITONQ_MAX_IN_FLIGHT", "many", "valid integer"),
        ("TRITONQ_MAX_BYTES", "100", "greater than or equal to 1024"),
        ("TRITONQ_SHUTDOWN_GRACE_S", "0", "greater than 0"),
        ("TRITONQ_PUBSUB_GIVE_UP_S", "-1", "greater than 0"),
        ("TRITONQ_MAX_DELIVERY_ATTEMPTS", "1", "greater than or equal to 5"),
        ("TRITONQ_HTTP_PORT", "70000", "less than or equal to 65535"),
        ("TRITONQ_MAX_INLINE_BYTES", str(8 * 1024 * 1024), "less than or equal to 7340032"),
        ("TRITONQ_MAX_INPUT_PIXELS", "0", "greater than or equal to 1"),
        ("TRITONQ_MAX_PIXELS_IN_FLIGHT", "0", "greater than or equal to 1"),
        ("TRITONQ_ROUTES", "enhance=1", "route 'enhance=1'"),
        ("TRITONQ_TRITON_URL", "http://triton:8001", "expected host:port"),
        ("TRITONQ_TRITON_URL", "triton", "expected host:port"),
        ("TRITONQ_TRITON_URL", "triton:99999", "expected host:port"),
        ("TRITONQ_INPUT_BUCKET", "gs://inputs", "is not a bucket name"),
        ("TRITONQ_ALLOWED_OUTPUT_BUCKETS", "ok,bad/path", "'bad/path' is not a bucket name"),
        ("TRITONQ_TOPIC", "projects/p/jobs", "expected a name or projects/<project>/<topics|subscriptions>/<name>"),
        ("TRITONQ_SUBSCRIPTION", "my sub", "expected a name or projects/"),
        ("TRITONQ_PROJECT", "", "is not a project id"),
    ],
)
def test_bad_values_fail_at_start_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as raised:
        Settings()
    (error,) = raised.value.errors()
    assert error["loc"] == (name.removeprefix("TRITONQ_").lower(),)
    assert message in str(raised.value)


def test_an_inline_limit_above_the_input_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITONQ_MAX_INPUT_BYTES", "1000")
    with pytest.raises(ValidationError, match=r"max_inline_bytes \(2097152\) exceeds max_input_bytes \(1000\)"):
        Settings()


def test_internal_tuning_is_not_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITONQ_RETRY_BASE_S", "0.001")
    assert "retry_base_s" not in Settings().model_dump()
    assert len(Settings.model_fields) <= 25


def test_settings_are_frozen() -> None:
    with pytest.raises(ValidationError):
        Settings().max_messages = 3  # type: ignore[misc]


def test_the_readme_documents_every_setting() -> None:
    assert settings_markdown() in README.read_text(), "regenerate the table: tritonq settings --markdown"


@pytest.mark.parametrize(
    ("cpu_max", "quota", "period", "cpus"),
    [
        ("200000 100000", None, None, 2.0),
        ("150000 100000", None, None, 1.5),
        ("max 100000", None, None, None),
        (None, "-1", "100000", None),  # cgroup v1, unlimited
        (None, "300000", "100000", 3.0),
        (None, None, None, None),
        ("garbage", None, None, None),
    ],
)
def test_the_cgroup_cpu_limit_is_read_from_v2_or_v1(
    cpu_max: str | None, quota: str | None, period: str | None, cpus: float | None
) -> None:
    assert cgroup_cpu_limit(cpu_max, quota, period) == cpus


def test_the_image_threads_follow_the_containers_cpu_limit_not_the_nodes_cores(tmp_path: Path) -> None:
    # A pod limited to 1.5 CPUs on a node of many cores: two threads, not one per core.
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))
