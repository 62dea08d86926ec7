"""Pure numbers of the benchmark: percentiles, Prometheus text, Triton's batch statistics.

No I/O here: the callers fetch text and JSON and hand it in, so every function
is unit-tested with literals.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PERCENTILES = (50, 95, 99)

_SAMPLE_RE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL_RE = re.compile(r'(?P<key>[A-Za-z_][A-Za-z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float], pcts: Iterable[int] = PERCENTILES) -> dict[str, float] | None:
    """``{"p50": ..., "p95": ..., "p99": ..., "mean": ...}`` in the values' unit, rounded; ``None`` when empty."""
    if not values:
        return None
    summary = {f"p{p}": round(percentile(values, p), 2) for p in pcts}
    summary["mean"] = round(sum(values) / len(values), 2)
    return summary


def parse_labels(text: str) -> dict[str, str]:
    return {m.group("key"): m.group("value") for m in _LABEL_RE.finditer(text)}


def metric_sum(text: str, name: str, where: Mapping[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` in Prometheus text whose labels include ``where``."""
    total = 0.0
    wanted = dict(where or {})
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if match is None or match.group("name") != name:
            continue
        labels = parse_labels(match.group("labels") or "")
        if all(labels.get(k) == v for k, v in wanted.items()):
            total += float(match.group("value"))
    return total


#: Outcomes that finish a job for good (``nacked`` and ``retried`` do not: the job comes back).
FINAL_OUTCOMES = ("succeeded", "failed_permanent", "duplicate")
#: The final outcomes a job has once, the first time it finishes; ``duplicate`` is a later copy of a
#: job already finished (a redelivery), so counting it would call a run done before its last job.
FIRST_OUTCOMES = ("succeeded", "failed_permanent")


def jobs_finished(worker_metrics: str) -> dict[str, float]:
    """The worker's ``tritonq_jobs_total`` by final outcome."""
    return {o: metric_sum(worker_metrics, "tritonq_jobs_total", {"outcome": o}) for o in FINAL_OUTCOMES}


@dataclass(frozen=True)
class TritonCounts:
    """Triton's counters of one model: requests inferred, executions (batches) run, and the
    microseconds its successful requests spent in all (``request_us``), queued (``queue_us``) and
    computing (``compute_us``, each request charged its batch's whole execution), summed over requests."""

    inferences: float
    executions: float
    request_us: float = 0.0
    queue_us: float = 0.0
    compute_us: float = 0.0

    @classmethod
    def parse(cls, metrics: str, model: str) -> TritonCounts:
        where = {"model": model}
        return cls(
            metric_sum(metrics, "nv_inference_count", where),
            metric_sum(metrics, "nv_inference_exec_count", where),
            metric_sum(metrics, "nv_inference_request_duration_us", where),
            metric_sum(metrics, "nv_inference_queue_duration_us", where),
            metric_sum(metrics, "nv_inference_compute_infer_duration_us", where),
        )

    def __sub__(self, other: TritonCounts) -> TritonCounts:
        return TritonCounts(
            self.inferences - other.inferences,
            self.executions - other.executions,
            self.request_us - other.request_us,
            self.queue_us - other.queue_us,
            self.compute_us - other.compute_us,
        )

    @property
    def avg_batch(self) -> float | None:
        return round(self.inferences / self.executions, 2) if self.executions else None

    def mean_ms(self) -> dict[str, float]:
        """Per request, in ms: in Triton in all, queued, computing (empty without requests)."""
        if not self.inferences:
            return {}
        parts = {"request": self.request_us, "queue": self.queue_us, "compute": self.compute_us}
        return {name: round(us / self.inferences / 1000, 3) for name, us in parts.items()}


def batch_histogram(stats: Mapping[str, Any]) -> dict[int, int]:
    """Executions by batch size, from Triton's ``/v2/models/{model}/stats`` JSON (summed over versions)."""
    histogram: dict[int, int] = {}
    for model in stats.get("model_stats", []):
        for entry in model.get("batch_stats", []):
            size = int(entry["batch_size"])
            count = int(entry.get("compute_infer", {}).get("count", 0))
            histogram[size] = histogram.get(size, 0) + count
    return histogram


def histogram_delta(after: Mapping[int, int], before: Mapping[int, int]) -> dict[int, int]:
    """Executions per batch size between two snapshots, zero sizes left out, sorted by size."""
    delta = {size: after[size] - before.get(size, 0) for size in sorted(after)}
    return {size: count for size, count in delta.items() if count > 0}


def steady_rate(
    samples: Sequence[tuple[float, float]], total: float, low: float = 0.1, high: float = 0.9
) -> float | None:
    """Slope of ``y`` per unit of ``x`` between the samples where ``x`` first reaches ``low`` and ``high`` of ``total``.

    ``samples`` are ``(x, y)`` pairs in time order, e.g. (jobs done, CPU seconds):
    the slope is the CPU per job in steady state, leaving out start-up and the tail.
    """
    start = next((s for s in samples if s[0] >= low * total), None)
    end = next((s for s in samples if s[0] >= high * total), None)
    if start is None or end is None or end[0] <= start[0]:
        return None
    return (end[1] - start[1]) / (end[0] - start[0])
