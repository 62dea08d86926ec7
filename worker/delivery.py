"""One Pub/Sub message as the pipeline sees it, how the library hands it over, and how long a nack keeps it away.

A ``Delivery`` carries what the pipeline reads (data, attributes, publish
time, delivery attempt) and the library's message, which the consumer acks or
nacks when the pipeline settles the delivery. It holds no I/O of its own, so
the pipeline's tests build deliveries directly. ``LoopScheduler`` is the
library's scheduler without its thread pool (``consumer.py`` says why).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.cloud.pubsub_v1.subscriber.message import Message
from google.cloud.pubsub_v1.subscriber.scheduler import Scheduler

#: Seconds a nacked message is kept away on its first delivery (no retry policy); doubled on each later one.
#: Attempts 1 to 4 wait 2, 4, 8 and 16 s, so a fifth delivery (the default dead-letter threshold) comes
#: only after about 30 s of failures, not after one second.
NACK_HOLD_BASE_S = 2.0
#: The longest such backoff, in seconds: a failing message comes back at least this often.
NACK_HOLD_MAX_S = 30.0


def nack_hold_s(delivery_attempt: int | None) -> float:
    """How long a message nacked on this delivery attempt stays away before it is redelivered."""
    attempt = max(1, delivery_attempt or 1)
    return float(min(NACK_HOLD_MAX_S, NACK_HOLD_BASE_S * 2 ** (attempt - 1)))


@dataclass(eq=False)
class Delivery:
    """One received message, until the pipeline acks or nacks it."""

    message_id: str
    data: bytes
    attributes: Mapping[str, str]
    publish_time: float  # seconds since the epoch
    delivery_attempt: int | None
    received_at: float = field(default_factory=time.monotonic)
    #: The library's message, which sends the ack or nack.
    message: Message | None = field(default=None, repr=False)
    #: Called once, with ``True`` for an ack and ``False`` for a nack: the consumer's bookkeeping.
    _settle: Callable[[Delivery, bool], None] | None = field(default=None, repr=False)
    _settled: bool = field(default=False, repr=False)
    _nacked: bool = field(default=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def nacked(self) -> bool:
        return self._nacked

    def ack(self) -> None:
        if not self._settled:
            self._settled = True
            if self._settle is not None:
                self._settle(self, True)

    def nack(self) -> None:
        """Give the message back for redelivery."""
        if not self._settled:
            self._settled = True
            self._nacked = True
            if self._settle is not None:
                self._settle(self, False)


class LoopScheduler(Scheduler):  # type: ignore[misc]  # the library ships no type information
    """The library's scheduler, minus the thread pool: the callback runs inline on the library's thread.

    The callback only schedules work on the event loop, so it returns at once, and nothing is ever
    left pending for ``shutdown`` to return.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    @property
    def queue(self) -> queue.Queue[Any]:
        return self._queue

    def schedule(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        callback(*args, **kwargs)

    def shutdown(self, await_msg_callbacks: bool = False) -> list[Message]:
        return []
