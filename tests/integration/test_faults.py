"""Faults on the real stack: nothing lost, nothing duplicated.

Each scenario of ``python -m chaos`` runs here at a small size: the worker
SIGKILLed and restarted, Triton killed and restarted, storage unreachable for
seconds, 10% bad messages of every kind, SIGTERM mid-run, and memory with a
backlog. The scenarios live in ``chaos/scenarios.py``; the accounting (from
GCS object generations and the dead-letter topic, never from the worker) in
``chaos/harness.py``. Each scenario stops what it starts.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos import scenarios
from chaos.accounting import Report, verify_duplicate_detection
from chaos.bad_messages import BAD_KINDS
from chaos.harness import MODEL
from devstack.components import DEFAULT_MODEL_REPOSITORY, Triton
from devstack.stack import Stack
from tests.integration.versioned import versioned_storage
from worker.consumer import LEASE_EXTENSION_S

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def stack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The session's stack with a versioning GCS emulator: the accounting counts generations."""
    with versioned_storage(stack, tmp_path_factory.mktemp("faults-gcs")) as versioned:
        yield versioned


#: The bound on the worker's peak RSS with a backlog: it holds flow-controlled messages, not the backlog.
MAX_RSS_MB = 400


def assert_clean(report: Report) -> None:
    """Every good job succeeded once, every bad message is accounted for."""
    assert report.lost == 0, report
    assert report.duplicate_results == 0, report
    assert report.bad_unaccounted == 0, report


async def test_the_accounting_sees_a_second_write(stack: Stack) -> None:
    # "duplicate_results == 0" means something only if an overwrite would be counted.
    await verify_duplicate_detection(stack)


@pytest.mark.parametrize("dead_streams", [1, 2, 3, 5])
def test_orphan_allowance_outlasts_the_emulators_unlucky_rounds(dead_streams: int) -> None:
    allowance = scenarios.orphan_allowance_s(dead_streams)
    rounds = allowance / LEASE_EXTENSION_S
    share_to_the_dead = dead_streams / (dead_streams + 1)
    assert share_to_the_dead**rounds <= scenarios.ORPHAN_MISS_ODDS
    # Not more than it needs: one round fewer would not do.
    assert share_to_the_dead ** (rounds - 1) > scenarios.ORPHAN_MISS_ODDS
    assert scenarios.orphan_allowance_s(0) == 0.0


# Its deadlines include the emulator's slow redelivery after kills (scenarios.orphan_allowance_s).
@pytest.mark.timeout(900)
async def test_worker_sigkilled_three_times_loses_and_duplicates_nothing(stack: Stack, tmp_path: Path) -> None:
    report = await scenarios.worker_killed(stack, tmp_path, jobs=120, kills=3)
    assert_clean(report)
    assert report.succeeded == 120
    assert report.notes["worker_starts"] == 4


@pytest.fixture
def own_triton(tmp_path: Path) -> Iterator[Triton]:
    """A Triton serving only ``enhance``, so killing it spares the session's and restarting it takes seconds."""
    repository = tmp_path / "model_repository"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY / MODEL, repository / MODEL)
    triton = Triton("triton-faults", tmp_path / "triton", model_repository=repository)
    triton.start()
    try:
        yield triton
    finally:
        triton.stop()


async def test_triton_killed_and_restarted_mid_run(stack: Stack, own_triton: Triton, tmp_path: Path) -> None:
    report = await scenarios.triton_restarted(stack, tmp_path, own_triton, jobs=200)
    assert_clean(report)
    assert report.succeeded == 200
    assert report.notes["worker_survived"]
    assert report.notes["infer_failures"] >= 1
    assert own_triton.running


async def test_storage_down_for_ten_seconds_mid_run(stack: Stack, tmp_path: Path) -> None:
    report = await scenarios.storage_outage(stack, tmp_path, jobs=200, outage_s=10.0)
    assert_clean(report)
    assert report.succeeded == 200
    assert report.notes["worker_survived"]
    # The outage was real: jobs failed against it and were nacked (back after a backoff).
    assert report.notes["nacks"] > 0


async def test_ten_percent_bad_messages_of_every_kind(stack: Stack, tmp_path: Path) -> None:
    report = await scenarios.bad_messages(stack, tmp_path, jobs=108, bad_share=0.1)
    assert_clean(report)
    assert report.succeeded == 108
    assert report.failed_permanent == len(BAD_KINDS)
    assert "unexpected_error_codes" not in report.notes, report.notes
    assert report.notes["worker_survived"]
    assert report.notes["last_exit_code"] == 0
    # Under a 1 GiB address-space limit, the hostile kinds among them: never a restart, never a dead probe.
    assert report.notes["memory_limit_mb"] == 1024 and report.notes["oom_kills"] in (0, None)
    assert report.notes["worker_starts"] == 1
    assert report.notes["healthz_probes"] > 0 and report.notes["healthz_failures"] == 0
    # Records stay small whatever the message held; metric labels stay the catalog's.
    assert report.notes["largest_bad_record_bytes"] < 4096
    assert report.notes["version_label_values"] <= 4  # 1, 2, default, unknown


async def test_sigterm_mid_run_exits_zero_within_the_grace_period(stack: Stack, tmp_path: Path) -> None:
    grace_s = 2.0
    # Enough jobs that the grace period cannot finish them all: a worker that keeps the lease on all
    # it was pushed can run 80 of these to the end within 2 s.
    jobs = 240
    report = await scenarios.sigterm(stack, tmp_path, jobs=jobs, grace_s=grace_s, image_size=(512, 512))
    assert report.notes["exit_code"] == 0
    assert report.notes["exit_s"] <= grace_s + scenarios.EXIT_SLACK_S
    # What the first worker did not finish went back to Pub/Sub, and the second worker finished it.
    assert report.notes["done_by_first"] < jobs
    assert_clean(report)
    assert report.succeeded == jobs


async def test_memory_stays_bounded_with_a_backlog(stack: Stack, tmp_path: Path) -> None:
    report = await scenarios.backlog_memory(stack, tmp_path, backlog=1500, drain=300)
    assert report.peak_rss_mb is not None
    assert report.peak_rss_mb < MAX_RSS_MB, report
    assert report.notes["exit_code"] == 0
    assert report.duplicate_results == 0
