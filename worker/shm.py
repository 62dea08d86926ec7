"""System shared memory between the worker and a co-located Triton: a pool of registered, reused regions.

When Triton runs beside the worker (same pod, sharing ``/dev/shm``), tensors
need not travel inside gRPC messages: the worker writes an input into a
region Triton can map, Triton writes the output into another, and the
messages carry only names and offsets. That saves the serialisation copies on
both sides; the output is even encoded straight from the region, never copied.

Regions are created per power-of-two size class, registered with Triton once
and reused; the pool holds at most ``max_bytes``, and a request that would
exceed it simply travels in the message. Triton forgets registrations when it
restarts: a region it does not know is re-registered on next use.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import tritonclient.utils.shared_memory as shm
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

log = structlog.get_logger(__name__)

#: The smallest region, in bytes: below this, copying into the message costs less than a region.
MIN_REGION_BYTES = 64 * 1024


def _size_class(nbytes: int) -> int:
    return max(MIN_REGION_BYTES, 1 << (max(nbytes, 1) - 1).bit_length())


@dataclass
class Region:
    """One registered region; ``array`` views it without copying."""

    name: str
    key: str
    size: int
    handle: Any = field(repr=False)
    registered: bool = False

    def write(self, array: NDArray[Any]) -> None:
        shm.set_shared_memory_region(self.handle, [np.ascontiguousarray(array)])

    def array(self, dtype: Any, shape: tuple[int, ...]) -> NDArray[Any]:
        """A view (no copy) of the region's first bytes as an array; valid until the region is released."""
        view: NDArray[Any] = shm.get_contents_as_numpy(self.handle, dtype, shape)
        return view


class ShmPool:
    """Regions by size class. ``acquire`` returns ``None`` when the budget is spent: use the message instead."""

    def __init__(self, control: Any, *, max_bytes: int) -> None:
        self._control = control
        self._max_bytes = max_bytes
        self._free: dict[int, list[Region]] = {}
        self._all: list[Region] = []
        self._bytes = 0
        self._ids = itertools.count()
        self._prefix = f"tritonq-{os.getpid()}"
        self._lock = asyncio.Lock()

    @property
    def allocated_bytes(self) -> int:
        return self._bytes

    async def probe(self) -> bool:
        """Register and drop one small region: false when Triton cannot map ours (it is not beside us)."""
        region = await self.acquire(1)
        if region is None:
            return False
        self.release(region)
        return region.registered

    async def acquire(self, nbytes: int) -> Region | None:
        size = _size_class(nbytes)
        free = self._free.get(size)
        region = free.pop() if free else None
        if region is None:
            async with self._lock:
                if self._bytes + size > self._max_bytes:
                    return None
                region = self._create(size)
        if not region.registered:
            try:
                await self._control.register_system_shared_memory(region.name, region.key, region.size)
            except InferenceServerException as exc:
                log.warning("shm_register_failed", region=region.name, error=exc.message())
                self.release(region)
                return None
            region.registered = True
        return region

    def release(self, region: Region) -> None:
        self._free.setdefault(region.size, []).append(region)

    def forget_registrations(self) -> None:
        """Triton restarted (or said it does not know a region): register each again before use."""
        for region in self._all:
            region.registered = False

    def _create(self, size: int) -> Region:
        name = f"{self._prefix}-{next(self._ids)}"
        key = f"/{name}"
        handle = shm.create_shared_memory_region(name, key, size)
        region = Region(name, key, size, handle)
        self._all.append(region)
        self._bytes += size
        return region

    async def close(self) -> None:
        for region in self._all:
            if region.registered:
                with contextlib.suppress(InferenceServerException):
                    await self._control.unregister_system_shared_memory(region.name)
            with contextlib.suppress(shm.SharedMemoryException):
                shm.destroy_shared_memory_region(region.handle)
        self._all.clear()
        self._free.clear()
        self._bytes = 0
