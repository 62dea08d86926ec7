"""The progress display: a numbered line per phase and a bar for anything that counts."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from tqdm import tqdm


class Progress:
    """Prints ``[i/n] phase`` lines with the elapsed time, and hands out bars."""

    def __init__(self, phases: int) -> None:
        self._phases = phases
        self._index = 0
        self._started = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def phase(self, name: str) -> None:
        self._index += 1
        print(f"[{self._index}/{self._phases} {self.elapsed_s:5.0f} s] {name}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        print(f"    {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def bar(self, desc: str, total: int, unit: str = "job") -> Iterator[Callable[[int], None]]:
        """A bar that ``update(n)`` advances; it disappears when done, and is not drawn off a terminal."""
        options = {"leave": False, "file": sys.stderr, "dynamic_ncols": True, "disable": None}
        with tqdm(total=total, desc=f"    {desc}", unit=unit, **options) as b:

            def update(n: int) -> None:
                if n:
                    b.update(n)

            yield update
