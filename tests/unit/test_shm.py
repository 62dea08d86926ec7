"""Shared-memory regions: unguessable, exclusive, open to the group, and never a reason for a job to fail.

Regions are real (``/dev/shm``); Triton's control calls are an in-memory stand-in that
records what would be registered. The two-uid path against a real Triton is
tests/integration/test_pod.py.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.utils.shared_memory as tshm

from worker import shm
from worker.wire import build_request


def _shm(name: str) -> Path:
    return Path("/dev/shm", name)


def _mode(name: str) -> int:
    return stat.S_IMODE(_shm(name).stat().st_mode)


def _plant(name: str) -> None:
    _shm(name).write_bytes(b"planted" + bytes(shm.MIN_REGION_BYTES))


def _planted(name: str) -> bool:
    return _shm(name).read_bytes().startswith(b"planted")


class Control:
    """Triton's shared-memory control calls, recorded."""

    def __init__(self) -> None:
        self.registered: dict[str, tuple[str, int]] = {}

    async def register_system_shared_memory(self, name: str, key: str, byte_size: int) -> None:
        self.registered[name] = (key, byte_size)

    async def unregister_system_shared_memory(self, name: str) -> None:
        self.registered.pop(name, None)


async def test_region_names_are_random_and_regions_group_read_write() -> None:
    control = Control()
    pools = [shm.ShmPool(control, max_bytes=1 << 20) for _ in range(2)]
    regions = [await pool.acquire(10) for pool in pools]
    try:
        names = [r.name for r in regions if r is not None]
        assert len(set(names)) == 2
        for name in names:
            # Nothing another process could derive (no pid, no counter): 128 random bits.
            assert re.fullmatch(r"tritonq-[0-9a-f]{32}", name), name
            assert str(os.getpid()) not in name
            assert _mode(name) == shm.REGION_MODE == 0o660
        assert set(control.registered) == set(names)
    finally:
        for pool in pools:
            await pool.close()
    assert not any(map(os.path.lexists, [f"/dev/shm/{name}" for name in names]))


async def test_a_planted_file_is_never_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    # Someone creates the file a region would use before the worker does.
    token = "ab" * shm.NAME_TOKEN_BYTES
    monkeypatch.setattr(shm.secrets, "token_hex", lambda _: token)
    name = f"tritonq-{token}"
    _plant(name)
    control = Control()
    pool = shm.ShmPool(control, max_bytes=1 << 20)
    try:
        assert await pool.acquire(10) is None  # the tensor travels in the message instead
        assert control.registered == {}
        assert pool.allocated_bytes == 0
        assert _planted(name)
    finally:
        await pool.close()
        os.unlink(f"/dev/shm/{name}")


async def test_a_region_that_cannot_be_created_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any, **__: Any) -> Any:
        raise tshm.SharedMemoryException("unable to create the shared memory region")

    monkeypatch.setattr(shm.shm, "create_shared_memory_region", refuse)
    pool = shm.ShmPool(Control(), max_bytes=1 << 20)
    assert await pool.acquire(10) is None
    assert pool.allocated_bytes == 0


async def test_a_tensor_whose_region_cannot_be_written_travels_in_the_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    control = Control()
    pool = shm.ShmPool(control, max_bytes=1 << 20)

    def fail(self: shm.Region, array: Any) -> None:
        raise tshm.SharedMemoryException("unable to set the shared memory region")

    monkeypatch.setattr(shm.Region, "write", fail)
    image = np.zeros((1, 64, 64, 3), np.uint8)
    regions: list[shm.Region] = []
    try:
        request = await build_request(
            "r1", "enhance", "", [("image", "UINT8", image)], parameters=None, limit_s=1.0, priority=0,
            shm_output=None, regions=regions, pool=pool,
        )  # fmt: skip
        assert regions == []
        assert request.raw_input_contents == [image.tobytes()]
        assert "shared_memory_region" not in request.inputs[0].parameters
        # The failed region is dropped, not handed out again.
        assert pool.allocated_bytes == 0 and control.registered == {}
    finally:
        await pool.close()


def test_a_region_refuses_an_array_larger_than_itself() -> None:
    handle = tshm.create_shared_memory_region("tritonq-test-small", "/tritonq-test-small", 16, create_only=True)
    region = shm.Region("tritonq-test-small", "/tritonq-test-small", 16, handle)
    try:
        with pytest.raises(tshm.SharedMemoryException):
            region.write(np.zeros(32, np.uint8))
        region.write(np.arange(16, dtype=np.uint8))
        assert region.array(np.uint8, (16,)).tolist() == list(range(16))
    finally:
        tshm.destroy_shared_memory_region(handle)
