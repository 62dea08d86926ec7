"""The bounded concurrency around jobs: which delivery starts next, how many pixels are held, what Triton gets next.

The workers that take deliveries off the queue, and three schedulers, each a bound with an order:

- ``DeliveryQueue``: the hand-off from the consumer to the pipeline, by priority then arrival;
- ``PixelBudget``: the pixels the jobs in flight hold at once, in arrival order;
- ``Admission``: the requests one model has in Triton, admitted in runs of one shape.

They hold no I/O and no clocks: each is driven by its callers' ``acquire``/``release``
(or ``put``/``get``), so a test drives one alone.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
from collections.abc import Awaitable, Callable

from worker import jobs
from worker.consumer import Delivery

Shape = tuple[int, ...]


async def run_workers(
    queue: asyncio.Queue[Delivery], handle: Callable[[Delivery], Awaitable[object]], count: int
) -> None:
    """Run ``count`` workers that take deliveries off ``queue`` and ``handle`` them, until cancelled.

    The number of jobs in progress is then one number, ``count``, whatever the queue holds.
    """
    async with asyncio.TaskGroup() as group:
        for index in range(count):
            group.create_task(_work(queue, handle), name=f"pipeline-worker-{index}")


async def _work(queue: asyncio.Queue[Delivery], handle: Callable[[Delivery], Awaitable[object]]) -> None:
    while True:
        delivery = await queue.get()
        try:
            await handle(delivery)
        finally:
            queue.task_done()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # A job that swallowed its cancellation (a bug turned it into another error) must not
            # keep this worker taking deliveries: the shutdown waits for it.
            raise asyncio.CancelledError


class DeliveryQueue(asyncio.Queue[Delivery]):
    """The hand-off from the consumer to the pipeline: by the job's priority, then by arrival.

    The priority comes from the message's ``priority`` attribute (``tritonq publish`` and
    ``JobClient`` set it from the job), so ordering needs no decoding on the consumer's side.
    Triton's own priority orders what is already in its queue; this orders what the worker
    holds but has not started, so a high-priority job overtakes a held backlog too.
    """

    # The same hooks asyncio.PriorityQueue overrides; ``_queue`` is the name the base class reads.
    def _init(self, maxsize: int) -> None:
        self._queue: list[tuple[int, int, Delivery]] = []
        self._arrivals = itertools.count()

    def _put(self, item: Delivery) -> None:
        rank = jobs.PRIORITIES.get(item.attributes.get("priority", "").lower(), jobs.PRIORITIES["normal"])
        heapq.heappush(self._queue, (rank, next(self._arrivals), item))

    def _get(self) -> Delivery:
        return heapq.heappop(self._queue)[2]


class PixelBudget:
    """Pixels the jobs in flight may hold at once: memory stays bounded whatever the images' sizes.

    ``max_in_flight`` bounds jobs, not bytes, and the input limit lets a few dozen
    large images need tens of GB between them. A job takes its weight
    (``ModelSpec.pixels_held``) after reading its input's header and before
    decoding it, and gives it back once its output is encoded. Jobs wait in
    arrival order; one job always runs, however large, so none waits forever.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def used(self) -> int:
        return self._used

    async def acquire(self, weight: int) -> None:
        if not self._waiting and self._fits(weight):
            self._used += weight
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (weight, future)
        self._waiting.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(weight)  # granted as we were cancelled: hand it on
            else:
                if entry in self._waiting:  # a grant may have passed over it already
                    self._waiting.remove(entry)
                self._grant()  # a large job leaving the head may let the next ones in
            raise

    def release(self, weight: int) -> None:
        self._used -= weight
        self._grant()

    def _fits(self, weight: int) -> bool:
        return self._used == 0 or self._used + weight <= self._limit

    def _grant(self) -> None:
        while self._waiting:
            weight, future = self._waiting[0]
            if future.done():
                # Cancelled while waiting (a shutdown cancels many at once): its task has not run
                # its handler yet, and leaves without pixels.
                self._waiting.popleft()
                continue
            if not self._fits(weight):
                return
            self._waiting.popleft()
            self._used += weight
            future.set_result(None)


#: Requests one model may have in Triton at once, in multiples of its ``max_batch_size``: enough for
#: full batches, few enough that the worker can still group the rest by shape.
TRITON_QUEUE_BATCHES = 2


class Admission:
    """Requests one model may have in Triton at once, admitted in runs of one shape.

    Triton's dynamic batcher batches only requests of one shape, and it takes its
    queue in order: a request of another shape closes the batch, so shapes sent
    interleaved run as many small executions. The worker therefore mostly sends
    one shape at a time per model: a request is admitted at once when the model
    has few in flight (under a quarter of ``batch``, the model's
    ``max_batch_size``: a quiet system waits for nothing), or when it has the
    shape admitted last and fewer than ``limit`` are in flight (a small multiple
    of ``batch``: the next batch is queued while one runs). After ``batch`` of
    one shape in a row while other shapes wait, the oldest waiting shape goes
    next. Waiting requests are admitted higher priorities first, then same
    shape, else oldest.
    """

    def __init__(self, batch: int, limit: int) -> None:
        self._batch = batch
        self._limit = max(limit, batch)
        # Any shape may start while fewer than a quarter batch are in flight: with none, Triton idles
        # between runs of one shape; with a whole batch, interleaved shapes split its batches.
        self._first = max(1, batch // 4)
        self._in_flight = 0
        self._waiting: list[tuple[int, int, Shape, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self._last: Shape | None = None
        self._streak = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, shape: Shape, priority: int) -> None:
        if not self._waiting and self._allowed(shape):
            self._admit(shape)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (priority or jobs.PRIORITIES["normal"], next(self._arrivals), shape, future)
        self._waiting.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # admitted as we were cancelled: hand the slot on
            elif entry in self._waiting:  # a release may have passed over it already
                self._waiting.remove(entry)
            raise

    def release(self) -> None:
        self._in_flight -= 1
        # Waiters cancelled but not yet resumed (a shutdown cancels many at once) take no slot.
        self._waiting = [entry for entry in self._waiting if not entry[3].done()]
        while (entry := self._pick()) is not None:
            self._waiting.remove(entry)
            self._admit(entry[2])
            entry[3].set_result(None)

    def _allowed(self, shape: Shape) -> bool:
        if self._in_flight < self._first:
            return True
        if self._in_flight >= self._limit or shape != self._last:
            return False
        return self._streak < self._batch or all(entry[2] == shape for entry in self._waiting)

    def _pick(self) -> tuple[int, int, Shape, asyncio.Future[None]] | None:
        if not self._waiting:
            return None
        best = min(entry[0] for entry in self._waiting)
        candidates = [entry for entry in self._waiting if entry[0] == best]
        same = next((entry for entry in candidates if entry[2] == self._last), None)
        if same is not None and self._allowed(same[2]):
            return same
        oldest = min(candidates, key=lambda entry: entry[1])
        return oldest if self._allowed(oldest[2]) else None

    def _admit(self, shape: Shape) -> None:
        self._in_flight += 1
        self._streak = self._streak + 1 if shape == self._last else 1
        self._last = shape
