"""Settings: environment parsing, validation, and the README table kept in step with the class."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.config import Settings, settings_markdown

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
