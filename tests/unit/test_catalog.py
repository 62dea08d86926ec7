"""The catalog's view of a model that failed to load: reported, its jobs told why, the others served.

Triton's control calls are an in-memory stand-in holding a repository index as Triton returns
it; the real Triton with a broken model is tests/integration/test_pod.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.unit.test_pipeline import ENHANCE
from worker.catalog import MAX_REASON_CHARS, Catalog
from worker.errors import TransientError
from worker.models import ModelSpec

REASON = "Internal: RuntimeError: this model is broken on purpose"


class Control:
    def __init__(self, index: list[dict[str, str]]) -> None:
        self.index = index

    async def repository_index(self) -> list[dict[str, str]]:
        return self.index

    async def model_spec(self, model: str) -> ModelSpec:
        return ModelSpec.from_triton_config({**ENHANCE, "name": model})


def ready(model: str) -> float | None:
    return REGISTRY.get_sample_value("tritonq_model_ready", {"model": model})


async def test_a_model_that_failed_to_load_is_reported_and_its_jobs_told_why() -> None:
    control = Control(
        [
            {"name": "enhance", "version": "1", "state": "READY"},
            {"name": "broken_a", "version": "1", "state": "UNAVAILABLE", "reason": REASON},
        ]
    )
    catalog = Catalog(control)  # type: ignore[arg-type]
    with capture_logs() as logs:
        await catalog.refresh()
        await catalog.refresh()
    assert set(catalog.models) == {"enhance"}
    assert ready("enhance") == 1 and ready("broken_a") == 0
    with pytest.raises(TransientError, match=r"broken_a is UNAVAILABLE in triton: .*broken on purpose"):
        await catalog.spec("broken_a")
    assert (await catalog.spec("enhance")).name == "enhance"
    # Logged once with Triton's reason, not at every refresh.
    unavailable = [event for event in logs if event["event"] == "model_unavailable"]
    assert unavailable == [{"event": "model_unavailable", "model": "broken_a", "reason": REASON, "log_level": "error"}]


async def test_a_long_reason_is_cut() -> None:
    reason: Any = "x" * (10 * MAX_REASON_CHARS)
    catalog = Catalog(Control([{"name": "broken_b", "version": "1", "state": "UNAVAILABLE", "reason": reason}]))  # type: ignore[arg-type]
    await catalog.refresh()
    with pytest.raises(TransientError) as caught:
        await catalog.spec("broken_b")
    assert len(str(caught.value)) < MAX_REASON_CHARS + 100
