"""A TCP proxy that can make what stands behind it look stopped: the storage outage of the chaos scenarios.

Why a proxy and not stopping fake-gcs-server itself: the emulator keeps its
objects in memory (``-backend memory``), so a real stop would also lose every
input and every result already written, which real GCS never does in an
outage, and the filesystem backend cannot keep object versions, which is how
the scenarios prove a result was written once. The proxy sits between the
worker and the emulator; ``cut()`` closes its listening socket (new
connections are refused) and resets every open connection (requests in flight
fail mid-way), which is exactly what the worker's sockets see when the storage
process dies; ``restore()`` listens again on the same port. The objects stay,
as they would in GCS.

The proxy runs its own event loop on a thread, so synchronous and asynchronous
callers (the scenarios, the tests) can drive it alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from devstack.probe import free_port

T = TypeVar("T")

#: Bytes copied per read: enough for a small image in one or two reads.
CHUNK_BYTES = 64 * 1024
#: Seconds a control call (start, cut, restore, stop) may take on the proxy's loop.
CONTROL_TIMEOUT_S = 10.0


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream_host:upstream_port``; ``start()`` once, ``stop()`` always."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._started = False
        #: Connections refused or reset while cut (what the outage did to the worker).
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self._started:
            raise RuntimeError("FaultProxy already started")
        self._started = True
        self._thread.start()
        self._call(self._listen())

    def cut(self) -> None:
        """Refuse new connections and reset the open ones, as a crashed server would."""
        self._call(self._cut())

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        self._call(self._listen())

    def stop(self) -> None:
        """Close everything and end the loop's thread; idempotent."""
        if not self._started or not self._thread.is_alive():
            return
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_S)
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT_S)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for pipe in list(self._pipes):
            pipe.cancel()
        if self._pipes:
            await asyncio.wait(self._pipes)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
                self._pipes.discard(pipe)
            for side in (writer, up_writer):
                self._writers.discard(side)
                side.close()  # flushes what is buffered; cut() aborts instead

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(CHUNK_BYTES):
                writer.write(data)
                await writer.drain()
