"""The report: ``bench.json``, ``bench.md`` and the summary table, from the figures ``bench.targets`` derived.

``markdown`` renders the readable report and ``table`` the summary printed at
the end of ``python -m bench`` (the main profile's rows, then the fast profile's,
marked ``fast:``). Everything here is pure except ``write``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.procstat import THREAD_GROUPS
from bench.targets import CEILINGS, lookup


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def fmt_latency(summary: Mapping[str, float] | None) -> str:
    if not summary:
        return "n/a"
    return " / ".join(f"{summary[p]:,.0f}" for p in ("p50", "p95", "p99")) + " ms"


def _target_text(doc: Mapping[str, Any], figure: str) -> str:
    for target in doc.get("targets", []):
        if target["figure"] == figure:
            mark = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
            return f"{target['op']} {fmt(target['limit'])} ({mark})"
    return ""


def _stack_text(stack: Mapping[str, float] | None) -> str:
    return ", ".join(f"{name} {fmt(value)}" for name, value in (stack or {}).items()) or "n/a"


#: The thread groups' order in the table: the event loop, the image pool, grpc's threads.
THREADS_TEXT = " / ".join(group.replace("_", " ") for group in THREAD_GROUPS)


def _threads_text(groups: Mapping[str, float] | None) -> str:
    return " / ".join(fmt((groups or {}).get(group)) for group in THREAD_GROUPS) if groups else "n/a"


def _parts_text(parts: Mapping[str, float] | None) -> str:
    return " + ".join(f"{name.replace('_', ' ')} {value:,.1f}" for name, value in (parts or {}).items()) or "n/a"


def _emulator_rows(doc: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The emulators' rates at the start and end of the run, and the slower over the faster."""
    probes = doc.get("emulators") or {}
    start, end = probes.get("start") or {}, probes.get("end") or {}
    return [
        (
            f"emulator {label} at start / end (slower / faster)",
            f"{fmt(start.get(key), 0)} / {fmt(end.get(key), 0)} ({fmt(probes.get(f'{name}_steady'))})",
            _target_text(doc, f"emulators.{name}_steady"),
        )
        for name, key, label in (
            ("gcs", "gcs_uploads_per_s", "GCS uploads/s"),
            ("pubsub", "pubsub_round_trip_msgs_per_s", "Pub/Sub round trips/s"),
        )
    ]


def rows(doc: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The summary table: figure, value, target."""
    size = doc.get("image_px")
    large = doc.get("large") or {}
    modes = doc.get("triton_modes") or {}
    sim = doc.get("sim_profile") or {}
    return [
        ("simulated GPU profile", sim.get("text", "n/a"), ""),
        (f"e2e_jobs_per_s ({doc.get('jobs')} jobs, {size} px, backlog)", fmt(doc.get("e2e_jobs_per_s")), ""),
        (f"naive_jobs_per_s ({doc.get('naive_jobs')} jobs)", fmt(doc.get("naive_jobs_per_s")), ""),
        ("speedup_vs_naive", fmt(doc.get("speedup_vs_naive")), _target_text(doc, "speedup_vs_naive")),
        *peer_rows(doc, doc),
        ("worker_cpu_ms_per_job", fmt(doc.get("worker_cpu_ms_per_job")), ""),
        ("floor_cpu_ms_per_job", fmt(doc.get("floor_cpu_ms_per_job")), ""),
        ("overhead_ratio", fmt(doc.get("overhead_ratio")), _target_text(doc, "overhead_ratio")),
        (
            "avg_batch_size / max_batch_size",
            f"{fmt(doc.get('avg_batch_size'))} / {fmt(doc.get('max_batch_size'))}",
            _target_text(doc, "avg_batch_size"),
        ),
        (
            f"latency_ms p50/p95/p99 (publish to ack, paced at {fmt(doc.get('latency_rate_per_s'), 0)}/s)",
            fmt_latency(doc.get("latency_ms")),
            "",
        ),
        ("backlog service_ms p50/p95/p99 (pull to ack)", fmt_latency(doc.get("service_ms")), ""),
        *limit_rows(doc),
        (
            f"low_rate_latency_ms p50/p95/p99 (at {fmt(doc.get('low_rate_per_s'), 0)}/s)",
            fmt_latency(doc.get("low_rate_latency_ms")),
            f"p50 {_target_text(doc, 'low_rate_latency_ms.p50')}",
        ),
        ("pubsub_delivery_ms p50/p95/p99 (publish to hand-out, alone)", fmt_latency(doc.get("pubsub_delivery_ms")), ""),
        (
            "low_rate_waiting_ms p50/p95/p99 (publish to pull, in the low-rate run)",
            fmt_latency(doc.get("low_rate_waiting_ms")),
            "",
        ),
        (
            f"low_rate_floor_ms ({_parts_text(doc.get('low_rate_floor_parts_ms'))})",
            fmt(doc.get("low_rate_floor_ms")),
            "",
        ),
        *_emulator_rows(doc),
        ("ceiling_infer_per_s", fmt(doc.get("ceiling_infer_per_s")), ""),
        ("ceiling_storage_jobs_per_s", fmt(doc.get("ceiling_storage_jobs_per_s")), ""),
        ("ceiling_pubsub_msgs_per_s", fmt(doc.get("ceiling_pubsub_msgs_per_s")), ""),
        (
            f"e2e_vs_ceiling (slowest: {doc.get('slowest_ceiling')})",
            fmt(doc.get("e2e_vs_ceiling")),
            _target_text(doc, "e2e_vs_ceiling"),
        ),
        (
            "machine_cpu_ms_per_job (worker + emulators + Triton)",
            f"{fmt(doc.get('machine_cpu_ms_per_job'))} ({_stack_text(doc.get('stack_cpu_ms_per_job'))})",
            "",
        ),
        ("ceiling_machine_cpu_jobs_per_s (CPUs / that)", fmt(doc.get("ceiling_machine_cpu_jobs_per_s")), ""),
        ("e2e_vs_machine_ceiling", fmt(doc.get("e2e_vs_machine_ceiling")), ""),
        (f"worker CPU ms/job by thread ({THREADS_TEXT})", _threads_text(doc.get("worker_thread_cpu_ms_per_job")), ""),
        ("peak_rss_mb", fmt(doc.get("peak_rss_mb"), 1), ""),
        ("redelivered copies in the main run (emulator churn)", fmt(doc.get("redelivered")), ""),
        (
            f"{large.get('image_px', 1024)} px payload_cpu_ms_per_job ({large.get('jobs')} jobs)",
            fmt(large.get("payload_cpu_ms_per_job")),
            "",
        ),
        (f"{large.get('image_px', 1024)} px shm_cpu_ms_per_job", fmt(large.get("shm_cpu_ms_per_job")), ""),
        (
            f"{large.get('image_px', 1024)} px overhead_ratio: payload / shm "
            f"(floor {fmt(large.get('floor_cpu_ms_per_job'))})",
            f"{fmt(large.get('payload_overhead_ratio'))} / {fmt(large.get('shm_overhead_ratio'))}",
            "",
        ),
        (
            f"{large.get('image_px', 1024)} px CPU ms/job by thread, payload; shm",
            f"{_threads_text(large.get('payload_thread_cpu_ms_per_job'))}; "
            f"{_threads_text(large.get('shm_thread_cpu_ms_per_job'))}",
            "",
        ),
        ("shared-memory CPU cut", fmt(large.get("shm_cpu_cut"), 3), _target_text(doc, "large.shm_cpu_cut")),
        (
            f"{large.get('image_px', 1024)} px shm overhead ratio",
            fmt(large.get("shm_overhead_ratio")),
            _target_text(doc, "large.shm_overhead_ratio"),
        ),
        (
            f"stream / unary jobs_per_s ({modes.get('jobs')} jobs)",
            f"{fmt(modes.get('stream_jobs_per_s'))} / {fmt(modes.get('unary_jobs_per_s'))}",
            "",
        ),
    ]


def peer_rows(doc: Mapping[str, Any], figures: Mapping[str, Any], path: str = "") -> list[tuple[str, str, str]]:
    """The idiomatic peer against the worker, for one profile's ``figures`` (at ``path`` in ``doc``)."""
    return [
        (f"peer_jobs_per_s ({figures.get('jobs')} jobs)", fmt(figures.get("peer_jobs_per_s")), ""),
        ("speedup_vs_peer", fmt(figures.get("speedup_vs_peer")), _target_text(doc, f"{path}speedup_vs_peer")),
        (
            "worker / peer CPU ms per job (ratio)",
            f"{fmt(figures.get('worker_cpu_ms_per_job'))} / {fmt(figures.get('peer_cpu_ms_per_job'))} "
            f"({fmt(figures.get('worker_cpu_vs_peer'))})",
            _target_text(doc, f"{path}worker_cpu_vs_peer"),
        ),
        (
            "worker / peer avg batch size",
            f"{fmt(figures.get('avg_batch_size'))} / {fmt(figures.get('peer_avg_batch_size'))}",
            "",
        ),
    ]


def limit_rows(figures: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """What held one profile's main run back: jobs in flight against the limit, the event loop's share of a core."""
    limit = (figures.get("worker_settings") or {}).get("max_in_flight")
    triton = lookup(figures, "runs.main.triton_ms") or {}
    infer = lookup(figures, "runs.main.stages_ms.infer")
    return [
        (f"jobs in flight by Little's law (limit {limit})", fmt(figures.get("littles_law_in_flight"), 1), ""),
        ("event loop CPU share of one core (main run)", fmt(figures.get("event_loop_core_share")), ""),
        (
            "event loop share of the run: running / runnable, waiting for a CPU",
            " / ".join(fmt(lookup(figures, f"runs.main.event_loop_share.{k}")) for k in ("running", "waiting_for_cpu")),
            "",
        ),
        (
            "infer stage ms; in Triton: in all / queued / computing (main run, mean per request)",
            f"{fmt(infer, 1)}; " + " / ".join(fmt(triton.get(k), 1) for k in ("request", "queue", "compute")),
            "",
        ),
    ]


def fast_rows(doc: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The second profile's key figures, ``fast:`` before each."""
    fast = lookup(doc, "profiles.fast")
    if not fast:
        return []
    path = "profiles.fast."
    rows = [
        ("simulated GPU profile", (fast.get("sim_profile") or {}).get("text", "n/a"), ""),
        (
            f"e2e_jobs_per_s ({fast.get('jobs')} jobs, {fast.get('image_px')} px, backlog)",
            fmt(fast.get("e2e_jobs_per_s")),
            "",
        ),
        *peer_rows(doc, fast, path),
        ("ceilings infer / storage / pubsub", " / ".join(fmt(fast.get(key)) for key in CEILINGS.values()), ""),
        (f"e2e_vs_ceiling (slowest: {fast.get('slowest_ceiling')})", fmt(fast.get("e2e_vs_ceiling")), ""),
        (
            "ceiling_machine_cpu_jobs_per_s (machine CPU ms/job)",
            f"{fmt(fast.get('ceiling_machine_cpu_jobs_per_s'))} ({fmt(fast.get('machine_cpu_ms_per_job'))})",
            "",
        ),
        (
            "e2e_vs_machine_ceiling",
            fmt(fast.get("e2e_vs_machine_ceiling")),
            _target_text(doc, f"{path}e2e_vs_machine_ceiling"),
        ),
        (f"worker CPU ms/job by thread ({THREADS_TEXT})", _threads_text(fast.get("worker_thread_cpu_ms_per_job")), ""),
        (
            f"latency_ms p50/p95/p99 (paced at {fmt(fast.get('latency_rate_per_s'), 0)}/s)",
            fmt_latency(fast.get("latency_ms")),
            "",
        ),
        ("backlog service_ms p50/p95/p99 (pull to ack)", fmt_latency(fast.get("service_ms")), ""),
        *limit_rows(fast),
        (
            f"low_rate_latency_ms p50/p95/p99 (floor {fmt(fast.get('low_rate_floor_ms'))})",
            fmt_latency(fast.get("low_rate_latency_ms")),
            f"p50 {_target_text(doc, f'{path}low_rate_latency_ms.p50')}",
        ),
    ]
    return [(f"fast: {name}", value, target) for name, value, target in rows]


def table(doc: Mapping[str, Any]) -> str:
    """The summary as a Markdown table (readable in a terminal too)."""
    header = ("figure", "value", "target")
    body = [*rows(doc), *fast_rows(doc)]
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(3)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


def sweep_table(sweep: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| max_in_flight | jobs | jobs/s | service p50 / p99 (ms) | avg batch | worker CPU ms/job |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for point in sweep:
        service = point.get("service_ms") or {}
        lines.append(
            f"| {point['max_in_flight']} | {point['jobs']} | {fmt(point.get('jobs_per_s'))} | "
            f"{fmt(service.get('p50'), 0)} / {fmt(service.get('p99'), 0)} | {fmt(point.get('avg_batch_size'))} | "
            f"{fmt(point.get('cpu_ms_per_job'))} |"
        )
    return "\n".join(lines)


def markdown(doc: Mapping[str, Any], plot_name: str | None) -> str:
    """``bench.md``: how it was made, the summary table, the sweep and its plot, the notes."""
    sim = doc.get("sim_profile") or {}
    settings = doc.get("worker_settings") or {}
    quick = " (quick: small N, figures indicative only)" if doc.get("quick") else ""
    parts = [
        "# tritonq benchmark",
        "",
        f"`{doc.get('command')}` on {doc.get('machine', {}).get('cpus')} CPUs, {doc.get('generated_at')}, "
        f"{fmt(doc.get('wall_s'), 0)} s in all{quick}.",
        "",
        f"Simulated GPU `sim_gpu`: {sim.get('text')}; max_batch_size {sim.get('max_batch_size')}, "
        f"preferred batch sizes {sim.get('preferred_batch_sizes')}, queue delay {sim.get('queue_delay_ms')} ms. "
        f"Worker settings of the main run: {', '.join(f'{k}={v}' for k, v in settings.items())}. "
        "Rows marked `fast:` are the second simulated GPU's, measured on a stack of their own.",
        "",
        table(doc),
        "",
        "## In-flight limit sweep",
        "",
        sweep_table(doc.get("sweep") or []),
        "",
    ]
    runs = {**(doc.get("runs") or {}), **{f"fast {k}": v for k, v in (lookup(doc, "profiles.fast.runs") or {}).items()}}
    stage_rows = [(name, run.get("stages_ms") or {}) for name, run in runs.items()]
    stage_names = sorted({stage for _, stages in stage_rows for stage in stages})
    if stage_names:
        parts += ["## Where a job's time goes (mean ms per stage, pull to record written)", ""]
        parts += ["| run | " + " | ".join(stage_names) + " |", "|---" * (len(stage_names) + 1) + "|"]
        parts += [
            f"| {name} | " + " | ".join(fmt(stages.get(stage), 1) for stage in stage_names) + " |"
            for name, stages in stage_rows
        ]
        parts.append("")
    if plot_name:
        parts += [f"![throughput and p99 latency against the in-flight limit]({plot_name})", ""]
    parts += ["## How each figure is measured", ""]
    parts += [f"- {note}" for note in doc.get("notes", [])]
    hot = doc.get("profile")
    if hot:
        parts += [
            "",
            "## Worker profile (py-spy --gil, main run)",
            "",
            "Sampled while the main run ran, so that run's figures above are perturbed by the sampling.",
            "",
            "| self | function |",
            "| --- | --- |",
        ]
        parts += [f"| {h['share']:.1%} | `{h['function']}` |" for h in hot.get("self", [])]
        parts += ["", "| inclusive | worker function |", "| --- | --- |"]
        parts += [f"| {h['share']:.1%} | `{h['function']}` |" for h in hot.get("inclusive", [])]
    return "\n".join(parts) + "\n"


def write(doc: Mapping[str, Any], out_dir: Path, plot_png: bytes | None) -> tuple[Path, Path]:
    """Write ``bench.json``, ``bench.md`` and (if given) ``bench.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "bench.json", out_dir / "bench.md"
    plot_name = None
    if plot_png is not None:
        plot_name = "bench.png"
        (out_dir / plot_name).write_bytes(plot_png)
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    md_path.write_text(markdown(doc, plot_name))
    return json_path, md_path
