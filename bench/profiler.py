"""Optional: sample the worker with py-spy during the main run, and name its hottest functions.

``py-spy record --gil`` samples only the thread holding the GIL, so the
samples are where the worker's Python code spends CPU (native work that
releases the GIL, such as the JPEG codecs, is the floor's and shows less).
It writes collapsed stacks (``frame;frame;frame count`` per line)
for a process it attaches to; ``hottest`` reduces them to the functions where
samples land (self time) and the share of samples under each function
(inclusive time). py-spy is not a dependency: ``--py-spy`` needs it installed
(``pip install py-spy``) and a system that lets it attach (ptrace).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: Samples per second py-spy takes of the worker.
RATE_HZ = 100
#: Seconds ``stop`` waits for py-spy to write its output after SIGINT.
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Hot:
    function: str
    share: float  # of all samples, 0..1


def executable() -> str | None:
    """py-spy on ``PATH``, or beside this interpreter (a virtual environment not activated)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


class PySpy:
    """``py-spy record --gil --format raw`` on ``pid`` until ``stop()``."""

    def __init__(self, binary: str, pid: int, output: Path) -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        self.output = output
        with output.with_suffix(".log").open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    binary, "record", "--pid", str(pid), "--rate", str(RATE_HZ),
                    "--format", "raw", "--output", str(output), "--nonblocking", "--gil",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """``(frames, count)`` per line of collapsed stacks, root first."""
    stacks: list[tuple[list[str], int]] = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _function(frame: str) -> str:
    # py-spy frames read "function (path/to/file.py:line)"; keep function and file, drop the line.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(Path(path).parts[-2:])})" if path else name


#: Frames under every sample (the interpreter's entry and the event loop's run): no information.
ROOT_FRAMES = ("_run_module_as_main", "_run_code", "<module>", "main (worker/cli.py)", "_run_worker", "Runner.run")


def hottest(text: str, top: int = 15, within: str = "(worker/") -> tuple[list[Hot], list[Hot]]:
    """The ``top`` functions by self samples, and the ``top`` functions of files matching ``within``
    (the product's own) by inclusive samples: which of its calls hold the most."""
    stacks = parse_collapsed(text)
    total = sum(n for _, n in stacks) or 1
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    for frames, n in stacks:
        names = [_function(f) for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not names:
            continue
        own[names[-1]] += n
        for name in set(names):
            if within in name and not name.startswith(ROOT_FRAMES):
                under[name] += n
    return (
        [Hot(f, n / total) for f, n in own.most_common(top)],
        [Hot(f, n / total) for f, n in under.most_common(top)],
    )
