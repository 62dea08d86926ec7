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
    monkeypatch.setenv("TRITONQ_ALLOWED_INPUT_BUCKETS", "a, b,,c")
    monkeypatch.setenv("TRITONQ_SUBSCRIPTION", "projects/p/subscriptions/s")
    settings = Settings()
    assert settings.max_messages == 7
    assert settings.input_buckets == frozenset({"a", "b", "c"})
    assert settings.output_buckets == frozenset({settings.output_bucket})
    assert settings.subscription_path == "projects/p/subscriptions/s"
    assert Settings(topic="t").topic_path == "projects/local-project/topics/t"


@pytest.mark.parametrize(
    ("name", "value"), [("TRITONQ_MAX_MESSAGES", "0"), ("TRITONQ_ROUTES", "enhance=1"), ("TRITONQ_LOG_FORMAT", "xml")]
)
def test_bad_values_fail_at_start(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


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
    assert Settings(preprocess_threads=3).thread_count == 3
