"""The catalog: the models and versions Triton serves now, with their specs, and why the others are not served.

The worker never keeps its own list of models: it reads Triton's repository
index and each model's config (through ``TritonControl``), so it cannot
disagree with what Triton serves. What a model takes and returns is
``worker.models``'; which of them are served right now is this module's.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import structlog

from worker import telemetry
from worker.errors import PermanentJobError, TransientError
from worker.models import ModelSpec

log = structlog.get_logger(__name__)


class Control(Protocol):
    """What the catalog asks of Triton's control plane (``worker.triton.TritonControl``)."""

    async def repository_index(self) -> list[dict[str, Any]]: ...

    async def model_spec(self, model: str) -> ModelSpec: ...


#: Characters of Triton's reason for an unavailable model kept for errors and logs: enough to
#: name the failure, short enough for a job record.
MAX_REASON_CHARS = 300

#: Seconds between catalog refreshes forced by a miss: a burst of jobs for an
#: unknown model must not turn into a burst of control-plane calls.
CATALOG_MIN_REFRESH_S = 2.0


class Catalog:
    """The models and versions Triton serves now, with their specs.

    Refreshed at start and again (at most every ``CATALOG_MIN_REFRESH_S``) when
    a job names a model or version it does not know, so a version loaded into
    Triton later is served without a worker restart. A model Triton does not
    have is the job's fault; one that is loading or unreachable is transient.
    """

    def __init__(self, control: Control) -> None:
        self._control = control
        self._specs: dict[str, ModelSpec] = {}
        self._ready: dict[str, frozenset[str]] = {}
        self._known: dict[str, str] = {}  # every model in the repository index, by state
        self._reasons: dict[str, str] = {}  # why a model that is not READY is not (Triton's words)
        self._unservable: set[str] = set()
        self._refreshed_at = -CATALOG_MIN_REFRESH_S
        self._lock = asyncio.Lock()

    @property
    def models(self) -> dict[str, frozenset[str]]:
        """Model name to its READY versions."""
        return dict(self._ready)

    def label(self, model: str) -> str:
        """The metrics label of a model: itself if served, else ``unknown`` (keeps label cardinality bounded)."""
        return model if model in self._known else "unknown"

    def version_label(self, model: str, version: str) -> str:
        """The metrics label of a version: itself if the catalog has it, ``default`` if none, else ``unknown``."""
        if not version:
            return "default"
        return version if version in self._ready.get(model, ()) else "unknown"

    async def refresh(self) -> None:
        async with self._lock:
            loop = asyncio.get_running_loop()
            index = await self._control.repository_index()
            ready: dict[str, set[str]] = {}
            known: dict[str, str] = {}
            reasons: dict[str, str] = {}
            for entry in index:
                name, state = entry["name"], entry.get("state", "")
                known[name] = "READY" if state == "READY" or known.get(name) == "READY" else state
                if state == "READY":
                    ready.setdefault(name, set()).add(entry.get("version", ""))
                elif entry.get("reason"):
                    reasons[name] = str(entry["reason"])[:MAX_REASON_CHARS]
            for name in ready:
                if name not in self._specs and name not in self._unservable:
                    try:
                        self._specs[name] = await self._control.model_spec(name)
                    except ValueError as exc:
                        # Ensemble steps and other helpers Triton serves but jobs may not name.
                        self._unservable.add(name)
                        log.info("model_not_servable", model=name, reason=str(exc))
            self._ready = {name: frozenset(v) for name, v in ready.items() if name in self._specs}
            self._report(known, reasons)
            self._known, self._reasons = known, reasons
            self._refreshed_at = loop.time()

    def _report(self, known: dict[str, str], reasons: dict[str, str]) -> None:
        """Publish each model's availability, and log a model that failed to load once, with why.

        Triton keeps serving the other models (``--exit-on-error=false``, non-strict readiness):
        this gauge and log line are where a broken model shows, not a restarting pod.
        """
        for name, state in known.items():
            telemetry.MODEL_READY.labels(model=name).set(1 if state == "READY" else 0)
            if state == "UNAVAILABLE" and self._known.get(name) != "UNAVAILABLE":
                log.error("model_unavailable", model=name, reason=reasons.get(name, ""))

    async def _maybe_refresh(self) -> None:
        if asyncio.get_running_loop().time() - self._refreshed_at >= CATALOG_MIN_REFRESH_S:
            await self.refresh()

    async def spec(self, model: str) -> ModelSpec:
        if model not in self._ready:
            await self._maybe_refresh()
        if model in self._ready:
            return self._specs[model]
        if model in self._unservable:
            raise PermanentJobError("unknown_model", f"model {model!r} takes no jobs (it has no tritonq_kind)")
        if model in self._known:
            reason = f": {self._reasons[model]}" if model in self._reasons else ""
            raise TransientError(f"model {model} is {self._known[model] or 'not ready'} in triton{reason}")
        if model in self._specs:
            raise TransientError(f"model {model} is not ready in triton")
        raise PermanentJobError("unknown_model", f"triton serves no model {model!r}")

    async def check_version(self, model: str, version: str) -> None:
        if not version or version in self._ready.get(model, ()):
            return
        await self._maybe_refresh()
        if version not in self._ready.get(model, ()):
            raise PermanentJobError("unknown_version", f"triton serves no version {version!r} of {model!r}")
