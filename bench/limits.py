"""``python -m bench.limits``: what limits the worker on the fast simulated GPU, one lever at a time.

On a stack with the fast profile (``options.FAST_PROFILE``), backlogs of the same
jobs drained by the worker as it is and with one thing changed: the in-flight
limit and flow control raised, Triton's admission window widened, unary calls
instead of streams, and two worker processes on the one subscription (what a
worker using two cores would give). The variants alternate over rounds, since
the machine is shared and only runs close in time compare. Each run reports
throughput, worker CPU per job, batch size, jobs in flight by Little's law, the
event loop's share of the run on a CPU and waiting for one, and the infer stage
against Triton's own time per request. Writes ``build/limits.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import options, procstat, sampling, sim_model, workload
from bench.progress import Progress
from bench.runs import MIN_RATE_PER_S, RUN_SLACK_S, Lab, RunFigures, RunSpec, backlog_run, started_lab
from devstack.probe import free_port
from devstack.worker_process import WorkerFailed
from worker.client import JobClient

#: One thing changed per variant; ``TWO_PROCESSES`` runs the default settings in two processes.
VARIANTS: dict[str, dict[str, str]] = {
    "as is": {},
    "in-flight 256": {"TRITONQ_MAX_IN_FLIGHT": "256", "TRITONQ_MAX_MESSAGES": "256"},
    "unary": {"TRITONQ_TRITON_MODE": "unary"},
}
TWO_PROCESSES = "two processes"
#: Seconds between scrapes of the two processes while they drain the backlog.
POLL_S = 0.5


def figures_of(figures: RunFigures) -> dict[str, Any]:
    """The figures that say what held a run back."""
    service = figures.service_ms or {}
    return {
        "jobs_per_s": round(figures.jobs_per_s, 1),
        "cpu_ms_per_job": None if figures.cpu_ms_per_job is None else round(figures.cpu_ms_per_job, 2),
        "avg_batch": figures.avg_batch,
        "littles_law_in_flight": round(figures.jobs_per_s * service.get("mean", 0.0) / 1000, 1),
        "event_loop_share": figures.event_loop_share,
        "infer_stage_ms": figures.stages_ms.get("infer"),
        "triton_ms": figures.triton_ms,
        "stages_ms": figures.stages_ms,
    }


async def two_processes(lab: Lab, spec: RunSpec) -> dict[str, Any]:
    """Two worker processes drain one backlog: throughput from the records, CPU of both past their start-up."""
    settings = lab.settings(spec.name)
    startup_cpu_s = lab.startup_cpu_s or 0.0
    async with JobClient(settings) as client:
        inputs = await lab.inputs(client, spec.size)
        jobs = workload.make_jobs(spec.name, inputs, spec.jobs, settings.allowed_output_buckets)
        with lab.progress.bar("publish", spec.jobs) as update:
            await workload.publish_backlog(client, jobs, update)
        second = settings.model_copy(update={"http_port": free_port()})
        with lab.worker(settings, f"{spec.name}-a", spec.env) as a, lab.worker(second, f"{spec.name}-b", spec.env) as b:
            deadline = time.monotonic() + RUN_SLACK_S + spec.jobs / MIN_RATE_PER_S
            while True:
                samples = [await asyncio.to_thread(sampling.sample_of, w) for w in (a, b)]
                done = sum(s.done for s in samples if s is not None)
                if done >= spec.jobs:
                    break
                if time.monotonic() > deadline or not (a.running and b.running):
                    raise WorkerFailed(f"two processes finished {done:.0f}/{spec.jobs}; see {a.log_path}")
                await asyncio.sleep(POLL_S)
            cpu_s = procstat.cpu_seconds(a.pid) + procstat.cpu_seconds(b.pid) - 2 * startup_cpu_s
        timings = await workload.read_timings(client, jobs)
    done_timings = [t for t in timings if t.succeeded]
    wall_s = max(t.finished_at for t in done_timings) - min(t.started_at for t in done_timings)
    mean_ms = sum(t.service_ms for t in done_timings) / len(done_timings)
    return {
        "jobs_per_s": round(len(done_timings) / wall_s, 1),
        "cpu_ms_per_job": round(cpu_s * 1000 / spec.jobs, 2),
        "littles_law_in_flight": round(len(done_timings) / wall_s * mean_ms / 1000, 1),
    }


async def measure(lab: Lab, jobs: int, rounds: int) -> dict[str, list[dict[str, Any]]]:
    await lab.measure_startup()
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in (*VARIANTS, TWO_PROCESSES)}
    for round_ in range(rounds):
        for name, env in VARIANTS.items():
            lab.progress.phase(f"round {round_ + 1}: {name}")
            spec = RunSpec(f"limits-{round_}-{name.replace(' ', '-')}", jobs, options.FULL.image_px, env)
            results[name].append(figures_of(await backlog_run(lab, spec)))
            lab.progress.note(str(results[name][-1]))
        lab.progress.phase(f"round {round_ + 1}: {TWO_PROCESSES}")
        spec = RunSpec(f"limits-{round_}-two", jobs, options.FULL.image_px)
        results[TWO_PROCESSES].append(await two_processes(lab, spec))
        lab.progress.note(str(results[TWO_PROCESSES][-1]))
    return results


def summary(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    lines = ["| variant | jobs/s by round | CPU ms/job | avg batch | in flight (Little) | loop running / waiting |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        shares = [r.get("event_loop_share") or {} for r in runs]
        loop = ", ".join(f"{s.get('running')} / {s.get('waiting_for_cpu')}" for s in shares)
        lines.append(
            f"| {name} | {', '.join(str(r['jobs_per_s']) for r in runs)} | "
            f"{', '.join(str(r['cpu_ms_per_job']) for r in runs)} | "
            f"{', '.join(str(r.get('avg_batch')) for r in runs)} | "
            f"{', '.join(str(r['littles_law_in_flight']) for r in runs)} | "
            f"{loop} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per run (default 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every variant (default 2)")
    parser.add_argument("--state-dir", type=Path, default=Path("build/limits-state"))
    parser.add_argument("--out", type=Path, default=Path("build/limits.json"))
    args = parser.parse_args(argv)
    state_dir = args.state_dir.resolve()
    profile = sim_model.SimProfile.parse(options.FAST_PROFILE)
    repository = sim_model.prepare_repository(state_dir / "model_repository", profile)
    progress = Progress(1 + args.rounds * (len(VARIANTS) + 1))
    progress.phase(f"starting the stack with sim_gpu {profile.describe()}")
    with started_lab(state_dir, repository, progress) as lab:
        results = asyncio.run(measure(lab, args.jobs, args.rounds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"profile": profile.describe(), "jobs": args.jobs, "results": results}, indent=2))
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
