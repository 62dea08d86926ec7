"""The bounds around jobs: the delivery queue's order, the pixel budget, admission by shape, the workers.

Each scheduler is driven alone. A request that must wait is made in a task that sets an event in the
same step as it calls ``acquire``: once the event is set, the request is queued in the scheduler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from tests.unit.test_pipeline import delivery, job_bytes
from worker.consumer import Delivery
from worker.scheduling import Admission, DeliveryQueue, PixelBudget, run_workers

pytestmark = pytest.mark.timeout(30)


async def queued(acquire: Awaitable[None]) -> asyncio.Task[None]:
    """``acquire`` started in a task that has reached the scheduler (queued, or already let in)."""
    entered = asyncio.Event()

    async def run() -> None:
        entered.set()  # the same step as the call below: nothing else runs between them
        await acquire

    task = asyncio.create_task(run())
    await entered.wait()
    return task


async def test_held_deliveries_are_handed_out_by_priority_then_arrival() -> None:
    queue = DeliveryQueue(maxsize=10)
    for name, priority in [("a", "low"), ("b", ""), ("c", "high"), ("d", "low"), ("e", "HIGH")]:
        d, _ = delivery(name.encode())
        d.attributes = {"priority": priority} if priority else {}
        queue.put_nowait(d)
    assert queue.qsize() == 5
    assert not queue.empty()
    order = [(await queue.get()).data.decode() for _ in range(5)]
    assert order == ["c", "e", "b", "a", "d"]
    assert queue.empty()


async def test_admission_sends_one_shape_at_a_time_past_a_quarter_batch() -> None:
    gate = Admission(batch=8, limit=16)
    a, b = (1, 64, 64, 3), (1, 32, 64, 3)
    admitted: list[str] = []

    async def request(name: str, shape: tuple[int, ...], priority: int = 0) -> None:
        await gate.acquire(shape, priority)
        admitted.append(name)

    # Two of any shape go straight in (a quarter of the batch); past that only the shape admitted last.
    for i in range(4):
        await request(f"a{i}", a)
    tasks = [await queued(request(f"b{i}", b)) for i in range(3)]
    tasks.append(await queued(request("b-high", b, priority=1)))
    assert admitted == ["a0", "a1", "a2", "a3"]
    assert gate.waiting == 4
    for _ in range(4):
        gate.release()  # the a's come back: the model is quiet, the b's may go
    await asyncio.gather(*tasks)
    assert admitted[4] == "b-high"  # higher priority first
    assert sorted(admitted[5:]) == ["b0", "b1", "b2"]
    assert gate.waiting == 0


async def test_admission_hands_the_slot_on_when_a_waiter_is_cancelled() -> None:
    gate = Admission(batch=4, limit=4)
    for _ in range(4):
        await gate.acquire((1,), 0)
    waiter = await queued(gate.acquire((1,), 0))
    assert gate.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.waiting == 0
    gate.release()
    await asyncio.wait_for(gate.acquire((1,), 0), 5)  # the freed slot is there to take


async def test_admission_passes_over_a_waiter_cancelled_but_not_yet_resumed() -> None:
    # A shutdown cancels many jobs at once: a slot freed before a cancelled waiter runs goes to the next.
    gate = Admission(batch=4, limit=4)
    for _ in range(4):
        await gate.acquire((1,), 0)
    cancelled = await queued(gate.acquire((1,), 0))
    waiting = await queued(gate.acquire((1,), 0))
    cancelled.cancel()
    gate.release()  # before `cancelled` resumes
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.wait_for(waiting, 5)
    assert gate.waiting == 0


async def test_pixel_budget_holds_jobs_past_it_in_arrival_order() -> None:
    budget = PixelBudget(limit=100)
    await budget.acquire(60)
    order: list[str] = []

    async def job(name: str, weight: int) -> None:
        await budget.acquire(weight)
        order.append(name)

    big = await queued(job("big", 50))
    small = await queued(job("small", 10))  # would fit, but waits behind the first in line
    assert (order, budget.used) == ([], 60)
    budget.release(60)
    await asyncio.gather(big, small)
    assert (order, budget.used) == (["big", "small"], 60)


async def test_pixel_budget_lets_one_job_past_it_run_alone() -> None:
    budget = PixelBudget(limit=100)
    await budget.acquire(500)  # larger than the whole budget: runs, since nothing else holds pixels
    waiter = await queued(budget.acquire(1))
    assert not waiter.done()
    budget.release(500)
    await asyncio.wait_for(waiter, 5)
    assert budget.used == 1


@pytest.mark.parametrize("freed_before_it_resumes", [False, True])
async def test_pixel_budget_lets_the_next_in_when_a_waiter_is_cancelled(freed_before_it_resumes: bool) -> None:
    # Freed before it resumes: pixels come back between the cancel and the cancelled task's handler,
    # as when a shutdown cancels many jobs at once.
    budget = PixelBudget(limit=100)
    await budget.acquire(50)
    huge = await queued(budget.acquire(90))
    small = await queued(budget.acquire(40))
    huge.cancel()
    if freed_before_it_resumes:
        budget.release(50)
    with pytest.raises(asyncio.CancelledError):
        await huge
    await asyncio.wait_for(small, 5)
    assert budget.used == (40 if freed_before_it_resumes else 90)


async def test_a_worker_stops_when_a_job_swallows_its_cancellation() -> None:
    started = asyncio.Event()
    swallowed: list[bool] = []

    async def handle(delivery: Delivery) -> str:
        started.set()
        try:
            await asyncio.Event().wait()  # a job that never ends by itself
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(True)
            return "nacked"  # the bug this guards against: a cancellation turned into an outcome
        return "succeeded"

    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    for _ in range(2):
        queue.put_nowait(delivery(job_bytes())[0])
    workers = asyncio.create_task(run_workers(queue, handle, 1))
    await started.wait()
    workers.cancel()
    try:
        await asyncio.wait({workers}, timeout=5)  # unlike wait_for, does not cancel again on timeout
        assert workers.cancelled()
        assert queue.qsize() == 1  # the second delivery was not taken
    finally:
        workers.cancel()  # the second cancellation is not swallowed
        await asyncio.wait({workers}, timeout=5)
