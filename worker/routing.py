"""Which model version serves a job.

A job may name its version; otherwise the version comes from a weighted split
configured in ``TRITONQ_ROUTES`` (``enhance=1:90,2:10``), and the pick is
sticky: it hashes the ``job_id``, so a redelivered job is served by the same
version as before. A model with no split is served by Triton's default version
(the empty string: the newest loaded one). Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

# Routing resolution: weights are compared against a hash bucket in [0, 10_000).
_BUCKETS = 10_000


@dataclass(frozen=True)
class Split:
    """A weighted split of one model's traffic over versions."""

    versions: tuple[str, ...]
    weights: tuple[int, ...]

    def pick(self, job_id: str, model: str) -> str:
        digest = hashlib.blake2b(f"{model}/{job_id}".encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") % _BUCKETS
        total = sum(self.weights)
        edge = 0
        for version, weight in zip(self.versions, self.weights, strict=True):
            edge += weight
            if point < edge * _BUCKETS // total:
                return version
        return self.versions[-1]


def parse_routes(text: str) -> dict[str, Split]:
    """Parse ``model=version:weight,version:weight;model2=...`` into splits.

    Raises ``ValueError`` with the offending part on any malformed entry.
    """
    routes: dict[str, Split] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        model, sep, spec = entry.partition("=")
        if not sep or not model.strip():
            raise ValueError(f"route {entry!r}: expected model=version:weight,...")
        versions: list[str] = []
        weights: list[int] = []
        for item in filter(None, (p.strip() for p in spec.split(","))):
            version, sep, weight = item.partition(":")
            if not sep or not version.strip().isdigit() or not weight.strip().isdigit():
                raise ValueError(f"route {entry!r}: {item!r} is not version:weight")
            versions.append(version.strip())
            weights.append(int(weight))
        if not versions or sum(weights) <= 0:
            raise ValueError(f"route {entry!r}: needs at least one version with a positive weight")
        routes[model.strip()] = Split(tuple(versions), tuple(weights))
    return routes


def choose_version(model: str, requested: str, job_id: str, routes: Mapping[str, Split]) -> str:
    """The version that serves this job: the requested one, else the split's sticky pick, else ``""``."""
    if requested:
        return requested
    split = routes.get(model)
    return split.pick(job_id, model) if split else ""
