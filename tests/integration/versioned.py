"""A GCS emulator that keeps object versions beside the session's stack, for the fault tests' accounting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from devstack.components import GcsEmulator
from devstack.stack import Stack, temporary_env


@contextlib.contextmanager
def versioned_storage(stack: Stack, folder: Path) -> Iterator[Stack]:
    """The stack's Pub/Sub and Triton with a GCS emulator that keeps object versions, as ``make chaos`` runs.

    The fault scenarios' accounting counts object generations, which only the emulator's memory backend
    keeps; this process's clients point at it for the duration of the block.
    """
    gcs = GcsEmulator("gcs-versioned", folder, backend="memory")
    gcs.start()
    try:
        with temporary_env({"STORAGE_EMULATOR_HOST": gcs.url}):
            yield stack.with_gcs(gcs)
    finally:
        gcs.stop()
