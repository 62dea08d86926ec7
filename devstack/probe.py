"""Free ports and readiness polling: what every child process of the development stack needs.

The emulators, Triton and the worker process each get a port picked free at
run time and are polled until they answer, against a deadline, failing early
when the process exits. One HTTP probe serves them all.
"""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.request
from collections.abc import Callable

#: Seconds between readiness polls: short enough that tests do not wait idle.
POLL_INTERVAL_S = 0.1
#: Seconds one probe may take: a component that is up answers at once.
PROBE_TIMEOUT_S = 2.0


class StackError(RuntimeError):
    """A process of the development stack could not be found, started, provisioned or made ready."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_ok(url: str) -> bool:
    """Whether ``url`` answers 200 now (a refused or failed request is a no, not an error)."""
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
            return bool(response.status == 200)
    except OSError:  # urllib's URLError and HTTPError are OSErrors
        return False


def wait_until(check: Callable[[], bool], what: str, timeout_s: float, alive: Callable[[], bool]) -> None:
    """Poll ``check`` until it is true; ``StackError`` if ``alive`` turns false or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise StackError(f"{what} exited before it was ready")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(POLL_INTERVAL_S)
    raise StackError(f"{what} not ready after {timeout_s:.0f} s")
