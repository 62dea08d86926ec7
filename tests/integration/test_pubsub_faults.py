"""The worker pulling through the Pub/Sub fault proxy: what the real service does and the emulator cannot play.

The scenarios of ``chaos/pubsub_scenarios.py`` at a small size: streams ended
with UNAVAILABLE every two seconds, PERMISSION_DENIED while a grant
"propagates", NOT_FOUND forever, acks and modacks answered late, acks failed.
Each checks, from GCS, that every job succeeded once, and that the fault was
really played (the proxy's counts).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos import pubsub_scenarios
from chaos.accounting import Report
from chaos.pubsub_proxy import PubsubFaults
from devstack.stack import Stack
from tests.integration.versioned import versioned_storage

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def stack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The session's stack with a versioning GCS emulator: the accounting counts generations."""
    with versioned_storage(stack, tmp_path_factory.mktemp("pubsub-faults-gcs")) as versioned:
        yield versioned


def assert_clean(report: Report, jobs: int) -> None:
    assert report.lost == 0, report
    assert report.duplicate_results == 0, report
    assert report.succeeded == jobs, report


async def test_streams_ended_every_two_seconds(stack: Stack, tmp_path: Path) -> None:
    # Enough jobs that the run outlasts a few stream ends, with a slow enough pace: small batches in flight.
    report = await pubsub_scenarios.streams_closed(stack, tmp_path, jobs=300, every_s=1.0)
    assert_clean(report, 300)
    assert report.notes["proxy"]["streams_closed"] >= 1, report.notes
    assert report.notes["last_exit_code"] == 0


async def test_permission_denied_while_a_grant_propagates(stack: Stack, tmp_path: Path) -> None:
    deny_s = 8.0
    report = await pubsub_scenarios.through_proxy(
        stack, tmp_path, "pubsub_permission_denied", PubsubFaults(deny_for_s=deny_s), jobs=60
    )
    assert_clean(report, 60)
    assert report.notes["proxy"]["denied"] >= 2, report.notes  # denied, subscribed again, denied again
    assert report.notes["resubscribed"] >= 1
    assert report.notes["first_success_s"] >= deny_s
    assert report.notes["last_exit_code"] == 0


async def test_not_found_forever_ends_the_worker_non_zero_within_its_window(stack: Stack, tmp_path: Path) -> None:
    give_up_s = 4.0
    report = await pubsub_scenarios.not_found(stack, tmp_path, jobs=20, give_up_s=give_up_s)
    assert report.notes["exit_code"] == 1, report.notes
    assert report.notes["first_failure_code"] == "NOT_FOUND"
    assert "NOT_FOUND" in report.notes["gave_up_reason"]
    assert give_up_s - 1 <= report.notes["failing_for_s"] <= give_up_s + 1
    # Nothing was taken while failing: a worker reaching the subscription directly does every job.
    assert_clean(report, 20)


async def test_acks_and_modacks_answered_late(stack: Stack, tmp_path: Path) -> None:
    report = await pubsub_scenarios.through_proxy(
        stack, tmp_path, "pubsub_settle_delayed", PubsubFaults(delay_settle_s=5.0), jobs=60
    )
    assert_clean(report, 60)
    assert report.notes["proxy"]["delayed"] >= 1, report.notes


async def test_a_third_of_acks_failing(stack: Stack, tmp_path: Path) -> None:
    report = await pubsub_scenarios.through_proxy(
        stack, tmp_path, "pubsub_acks_dropped", PubsubFaults(drop_ack_share=0.3), jobs=60
    )
    assert_clean(report, 60)
    assert report.notes["proxy"]["acks_dropped"] >= 1, report.notes
