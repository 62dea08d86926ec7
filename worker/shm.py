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

Triton maps our regions from another uid (in the pod, another container), so a
region is readable and writable by its group: the two share a gid (the pod's
``runAsGroup``), never a uid, which keeps Triton's own Python-backend regions
(mode 0600) out of the worker's reach. Region names are random (``secrets``)
and created exclusively (``O_EXCL``): a file planted under ``/dev/shm`` under a
name we might use is never taken. A region that cannot be created or written
is not an error: that tensor travels in the message instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
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
#: Owner and group read-write: Triton runs as another uid in the worker's group.
REGION_MODE = 0o660
#: Random bytes in a region name: 128 bits, so no other process can predict one.
NAME_TOKEN_BYTES = 16


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
        """Copy ``array`` in; raises ``shm.SharedMemoryException`` if it does not fit or cannot be written."""
        if array.nbytes > self.size:
            raise shm.SharedMemoryException(f"{array.nbytes} bytes do not fit region {self.name} ({self.size})")
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
                try:
                    region = self._create(size)
                except (shm.SharedMemoryException, OSError) as exc:
                    log.warning("shm_create_failed", size=size, error=str(exc.__cause__ or exc))
                    return None
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

    async def discard(self, region: Region) -> None:
        """Drop a region that failed (a write that did not land): it is never handed out again."""
        if region in self._all:
            self._all.remove(region)
            self._bytes -= region.size
        await self._destroy(region)

    def forget_registrations(self) -> None:
        """Triton restarted (or said it does not know a region): register each again before use."""
        for region in self._all:
            region.registered = False

    def _create(self, size: int) -> Region:
        name = f"tritonq-{secrets.token_hex(NAME_TOKEN_BYTES)}"
        key = f"/{name}"
        # create_only: O_CREAT | O_EXCL, so an existing file of that name is an error, never reused.
        handle = shm.create_shared_memory_region(name, key, size, create_only=True)
        try:
            # multiprocessing creates it 0600 whatever the umask: open it to the group, on the fd we created.
            os.fchmod(handle._mpsm_handle._fd, REGION_MODE)
        except OSError:
            shm.destroy_shared_memory_region(handle)
            raise
        region = Region(name, key, size, handle)
        self._all.append(region)
        self._bytes += size
        return region

    async def _destroy(self, region: Region) -> None:
        if region.registered:
            with contextlib.suppress(InferenceServerException):
                await self._control.unregister_system_shared_memory(region.name)
        with contextlib.suppress(shm.SharedMemoryException, OSError):
            shm.destroy_shared_memory_region(region.handle)

    async def close(self) -> None:
        for region in self._all:
            await self._destroy(region)
        self._all.clear()
        self._free.clear()
        self._bytes = 0
