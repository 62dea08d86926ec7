"""Fixtures that start the real components: the Pub/Sub emulator, the GCS emulator, Triton, and the worker.

The stack starts once per session through ``devstack/stack.py`` (the code
``tritonq stack`` and ``make demo`` use) and stops when the session ends.
Every test that publishes gets its own topic and subscription, so one test's
messages never reach another's worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.components import Triton
from devstack.stack import Stack
from worker.config import Settings
from worker.service import Worker

#: Seconds a test worker gets to stop; its stop is ordered and cannot hang longer.
WORKER_STOP_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    repository = os.environ.get("TRITONQ_TEST_MODEL_REPOSITORY")
    kwargs: dict[str, Any] = {"model_repository": Path(repository)} if repository else {}
    stack = Stack(state_dir=tmp_path_factory.mktemp("stack"), **kwargs)
    stack.start()
    base = Settings()
    stack.provision(base)
    try:
        with stack.environ(base):
            yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def triton(stack: Stack) -> Triton:
    return stack.triton


@pytest.fixture
def make_settings(stack: Stack) -> Callable[..., Settings]:
    """Settings with a fresh topic and subscription (created), pointing at the stack."""

    def make(**overrides: Any) -> Settings:
        suffix = uuid.uuid4().hex[:10]
        values: dict[str, Any] = {
            "topic": f"jobs-{suffix}",
            "subscription": f"jobs-{suffix}-worker",
            "triton_url": stack.triton.grpc_url,
            "http_port": 0,
            "log_format": "json",
            "shutdown_grace_s": 20.0,
        }
        values.update(overrides)
        settings = Settings(**values)
        stack.provision_pubsub(settings)
        return settings

    return make


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker serving ``settings`` in this event loop until the block ends."""
    worker = Worker(settings)
    task = asyncio.create_task(worker.run(), name="test-worker")
    serving = asyncio.create_task(worker.serving.wait())
    try:
        await asyncio.wait({task, serving}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # the worker failed to start: raise its error here
        yield worker
    finally:
        serving.cancel()
        worker.request_stop()
        await asyncio.wait_for(task, WORKER_STOP_TIMEOUT_S)


@pytest.fixture
def worker_for() -> Callable[[Settings], contextlib.AbstractAsyncContextManager[Worker]]:
    return running_worker
