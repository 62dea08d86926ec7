"""The Grafana dashboard only graphs metrics that exist: the worker's own, or Triton's."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import worker.telemetry  # noqa: F401 - registers the worker's metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "tritonq-dashboard.json"
#: Triton's metrics the dashboard uses (Triton 2.51, CPU and GPU).
TRITON_METRICS = {
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_request_success",
    "nv_inference_request_failure",
}


def test_every_query_names_a_real_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    # A labelled metric has no samples before it is used: derive its series names from its type.
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    worker_metrics = {
        metric.name + suffix for metric in REGISTRY.collect() for suffix in suffixes.get(metric.type, ("",))
    }
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert expressions
    used = {name for expr in expressions for name in re.findall(r"\b((?:tritonq|nv)_[a-z_]+)\b", expr)}
    unknown = used - worker_metrics - TRITON_METRICS
    assert not unknown, f"the dashboard graphs metrics nobody exports: {sorted(unknown)}"
    assert any(name.startswith("tritonq_") for name in used)
    assert used & TRITON_METRICS
