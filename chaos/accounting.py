"""The accounting of a fault scenario: what the output buckets hold, read back from GCS, and the report line.

Results are written create-only (``ifGenerationMatch=0``), so a second write
of the same object must fail; with object versioning on, a second write that
did succeed would leave a second generation behind, so counting the
generations of every object name is a proof of "written once", not a guess
from the logs. ``verify_duplicate_detection`` checks the emulator honours both
halves (an overwrite shows as two generations; a create-only rewrite fails).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from devstack.stack import Stack
from worker.jobs import GcsRef
from worker.storage import Storage


@dataclass
class Report:
    """One line of ``build/chaos.json``."""

    scenario: str
    published: int
    succeeded: int
    failed_permanent: int
    lost: int
    duplicate_results: int
    seconds: float
    dead_lettered: int = 0
    bad_unaccounted: int = 0
    peak_rss_mb: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Snapshot:
    """What the output bucket holds: every generation of every object, and the records by job."""

    generations: dict[str, list[dict[str, Any]]]
    prefix: str

    def record(self, key: str) -> dict[str, Any] | None:
        """The newest metadata of ``{prefix}/{key}.json`` (key: a job_id or ``_invalid/{message_id}``)."""
        versions = self.generations.get(f"{self.prefix}/{key}.json")
        return versions[-1] if versions else None

    def succeeded(self, job_id: str) -> bool:
        record = self.record(job_id)
        return record is not None and "error_code" not in record.get("metadata", {})

    def failed(self, key: str) -> bool:
        record = self.record(key)
        return record is not None and "error_code" in record.get("metadata", {})

    def error_code(self, key: str) -> str:
        record = self.record(key)
        return str(record.get("metadata", {}).get("error_code", "")) if record else ""

    def duplicated(self) -> list[str]:
        """Object names written more than once (more than one generation ever existed)."""
        return sorted(name for name, versions in self.generations.items() if len(versions) > 1)


async def verify_duplicate_detection(stack: Stack) -> None:
    """The accounting's own check: an overwrite is seen as two generations, and create-only refuses a rewrite."""
    bucket = f"chaos-probe-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as session:
        url = f"{stack.gcs.url}/storage/v1/b?project=local-project"
        async with session.post(url, json={"name": bucket, "versioning": {"enabled": True}}) as response:
            response.raise_for_status()
    storage = Storage()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = stack.gcs.url
    try:
        await storage.start()
        ref = GcsRef(bucket, "probe/once.json")
        assert await storage.write_once(ref, b"{}", "application/json") is True
        assert await storage.write_once(ref, b"{}", "application/json") is False, "create-only write overwrote"
        twice = GcsRef(bucket, "probe/twice.json")
        await storage.upload(twice, b"1", "application/json")
        await storage.upload(twice, b"2", "application/json")
    finally:
        await storage.close()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
    async with aiohttp.ClientSession() as session:
        url = f"{stack.gcs.url}/storage/v1/b/{bucket}/o"
        async with session.get(url, params={"versions": "true"}) as response:
            items = (await response.json()).get("items", [])
    counts: dict[str, int] = {}
    for item in items:
        counts[item["name"]] = counts.get(item["name"], 0) + 1
    assert counts == {"probe/once.json": 1, "probe/twice.json": 2}, counts
