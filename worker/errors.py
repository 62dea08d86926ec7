"""The error types that decide a job's fate.

Every failure the pipeline can meet is one of two kinds. A ``PermanentJobError``
is bad input (malformed message, unknown model, missing object, not an image):
retrying cannot help, so the worker records the error and acks. A
``TransientError`` is the world being briefly unwell (Triton restarting, GCS
5xx, a reset stream): retried in-process with backoff, then nacked so Pub/Sub
redelivers. Anything else is a bug, nacked and counted.

Error texts travel into records, logs and the results topic, and may quote
what a producer sent: ``clip`` bounds them and keeps only printable text, so
a message cannot make the worker write or publish more than it received.

``retrying`` is the in-process retry a ``TransientError`` calls for: exponential
backoff with full jitter, so workers failing together do not retry together.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: Longest error text kept: enough for a reason and the value it names, too short to amplify input.
MAX_ERROR_CHARS = 300


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` with unprintable characters escaped and cut to ``limit`` characters (an ellipsis marks a cut)."""
    printable = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit * 4])
    return printable if len(printable) <= limit else printable[: limit - 1] + "\u2026"


class TritonqError(Exception):
    """Base of the project's errors."""


class PermanentJobError(TritonqError):
    """Bad input: never retried; an error record is written and the message acked.

    ``code`` is a short machine-readable reason (``invalid_message``,
    ``unknown_model``, ``input_not_found``, ``not_an_image``, ...) that lands in
    the result record and in the ``reason`` label of the failure metric.
    """

    def __init__(self, code: str, message: str) -> None:
        message = clip(message)
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class TransientError(TritonqError):
    """A failure worth retrying: Triton unavailable, GCS 429/5xx, a broken stream."""


#: Tries of a step that fails transiently before its job is nacked: enough to ride out a blip,
#: few enough that a real outage goes back to Pub/Sub, whose redelivery backs off for longer.
RETRY_ATTEMPTS = 3
#: Seconds before the first retry; it doubles each try, with full jitter.
RETRY_BASE_S = 0.2


async def retrying(
    step: Callable[[], Awaitable[T]],
    *,
    what: str,
    on_retry: Callable[[], None],
    attempts: int = RETRY_ATTEMPTS,
    base_s: float = RETRY_BASE_S,
) -> T:
    """Run ``step``; on ``TransientError`` retry with exponential backoff and full jitter, then give up."""
    for attempt in range(1, attempts + 1):
        try:
            return await step()
        except TransientError as exc:
            if attempt == attempts:
                raise
            on_retry()
            delay = random.uniform(0, base_s * 2 ** (attempt - 1))
            log.info("retrying", step=what, attempt=attempt, delay_s=round(delay, 3), error=clip(str(exc)))
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
