"""``python -m bench``: start the stack with the simulated GPU, run every phase, write the report.

Phases, in order, all on one stack (each run has its own topic and subscription):

1. the floor: the image work alone, in a tight loop; an idle worker's start-up CPU;
2. the ceilings: Triton, storage and Pub/Sub, each alone;
3. the naive worker on its own backlog;
4. the product worker at a low rate (5 jobs/s), for latency on a quiet system;
5. the product worker draining the main backlog (2,000 jobs): throughput, CPU, memory, batches;
6. the product worker paced just under that throughput: latency at saturation;
7. the in-flight limit sweep (smaller backlogs), for the plot;
8. 1024 px images with and without shared memory;
9. streaming against unary inference.

A phase that fails is recorded under ``errors`` and the next one runs, so a
broken phase costs its figures, not the report. Every process started here is
stopped in ``finally`` blocks (the stack's ``stop`` and the worker context).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bench import ceilings, emulators, options, plot, profiler, report, sim_model, stats, workload
from bench.floor import measure_floor
from bench.naive import NaiveWorker
from bench.progress import Progress
from bench.runs import Lab, RunSpec, backlog_run, paced_run, started_lab
from worker import images
from worker.client import JobClient
from worker.config import Settings
from worker.models import ModelSpec
from worker.triton import TritonControl

PHASES = 11
#: Seconds the Pub/Sub ceiling may take at worst.
PUBSUB_CEILING_TIMEOUT_S = 300.0


class Bench:
    """One benchmark run: the lab, the options, and the document the phases fill in."""

    def __init__(self, lab: Lab, opts: options.Options, spec: ModelSpec, effective: Settings) -> None:
        self.lab = lab
        self.opts = opts
        self.sizes = opts.sizes
        self.spec = spec
        self.effective = effective
        self.doc: dict[str, Any] = {"errors": {}}

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[None]:
        """A numbered phase; its failure is recorded and the benchmark goes on."""
        self.lab.progress.phase(name)
        started = time.monotonic()
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - one phase's failure must not lose the others' figures
            self.doc["errors"][name] = f"{type(exc).__name__}: {exc}"
            self.lab.progress.note(f"FAILED: {type(exc).__name__}: {exc}")
        else:
            self.lab.progress.note(f"done in {time.monotonic() - started:.0f} s")

    async def run(self) -> None:
        sizes, doc = self.sizes, self.doc
        await self._probe_emulators("start")
        async with JobClient(self.effective) as client:
            small = await self.lab.inputs(client, sizes.image_px)
            large = await self.lab.inputs(client, sizes.large_px)
        decoded = [images.decode(data, _limits(self.effective)) for data in small.images]

        async with self.phase("floor: image work alone, single-threaded, no I/O"):
            floor = await asyncio.to_thread(measure_floor, self.spec, small.images, sizes.floor_jobs)
            doc["floor_cpu_ms_per_job"] = floor.cpu_ms_per_job
            doc["floor"] = floor.__dict__
            self.lab.progress.note(f"floor {floor.cpu_ms_per_job:.2f} ms/job")

        async with self.phase("worker start-up: an idle worker's time and CPU until ready"):
            startup_s, startup_cpu_s = await self.lab.measure_startup()
            doc["worker_startup_s"], doc["worker_startup_cpu_s"] = round(startup_s, 2), round(startup_cpu_s, 3)
            self.lab.progress.note(f"ready in {startup_s:.1f} s, {startup_cpu_s:.2f} CPU s")

        await self._ceilings(small, decoded)

        async with self.phase(f"naive worker: {sizes.naive_jobs} jobs, one at a time"):
            settings = self.lab.settings("naive")
            async with JobClient(settings) as client:
                jobs = workload.make_jobs("naive", small, sizes.naive_jobs, settings.allowed_output_buckets)
                with self.lab.progress.bar("publish", len(jobs)) as update:
                    await workload.publish_backlog(client, jobs, update)
            naive = NaiveWorker(settings, self.spec, self.lab.stack.gcs.url)
            with self.lab.progress.bar("naive worker", sizes.naive_jobs) as update:
                result = await asyncio.to_thread(naive.run, sizes.naive_jobs, update)
            doc["naive_jobs"], doc["naive_jobs_per_s"] = sizes.naive_jobs, round(result.jobs_per_s, 2)
            self.lab.progress.note(f"naive {result.jobs_per_s:.1f} jobs/s")

        async with self.phase(f"low rate: {sizes.low_rate_jobs} jobs at {sizes.low_rate_per_s:g}/s"):
            figures = await paced_run(
                self.lab, RunSpec("low-rate", sizes.low_rate_jobs, sizes.image_px), sizes.low_rate_per_s
            )
            doc["low_rate_latency_ms"] = figures.latency_ms
            doc["low_rate_stages_ms"] = figures.stages_ms
            doc["low_rate_waiting_ms"] = figures.waiting_ms
            doc["low_rate_per_s"], doc["low_rate_jobs"] = sizes.low_rate_per_s, sizes.low_rate_jobs
            doc.setdefault("runs", {})["low_rate"] = figures.as_dict()
            self.lab.progress.note(f"latency {report.fmt_latency(figures.latency_ms)}")

        await self._main_run()

        e2e = doc.get("e2e_jobs_per_s")
        async with self.phase("latency at saturation: paced just under the e2e throughput"):
            if not e2e:
                raise RuntimeError("needs the main run's throughput")
            rate = round(e2e * sizes.saturation_fraction, 1)
            count = max(50, int(rate * sizes.saturation_s))
            figures = await paced_run(self.lab, RunSpec("saturation", count, sizes.image_px), rate)
            doc["latency_ms"], doc["latency_rate_per_s"] = figures.latency_ms, rate
            doc.setdefault("runs", {})["saturation"] = figures.as_dict()
            self.lab.progress.note(f"at {rate:g}/s: latency {report.fmt_latency(figures.latency_ms)}")

        async with self.phase(f"in-flight sweep {list(sizes.sweep)}: {sizes.sweep_jobs} jobs each"):
            doc["sweep"] = []
            for limit in sizes.sweep:
                env = {"TRITONQ_MAX_IN_FLIGHT": str(limit), "TRITONQ_MAX_MESSAGES": str(limit)}
                figures = await backlog_run(self.lab, RunSpec(f"sweep-{limit}", sizes.sweep_jobs, sizes.image_px, env))
                doc["sweep"].append({"max_in_flight": limit, **figures.as_dict()})
                self.lab.progress.note(f"in-flight {limit}: {figures.jobs_per_s:.1f} jobs/s")

        await self._large(large)
        await self._modes()
        await self._probe_emulators("end")

    async def _probe_emulators(self, when: str) -> None:
        """The emulators' own rates, so the report shows whether the stack slowed as the runs filled it."""
        rates = await asyncio.to_thread(emulators.probe, self.lab.stack, self.effective.project)
        self.doc.setdefault("emulators", {})[when] = rates
        self.lab.progress.note(f"emulators at the {when}: {rates}")

    async def _ceilings(self, small: workload.Inputs, decoded: Sequence[np.ndarray[Any, Any]]) -> None:
        sizes, doc, lab = self.sizes, self.doc, self.lab
        concurrency = self.effective.max_in_flight
        async with self.phase(f"ceilings: Triton, storage, Pub/Sub alone ({sizes.ceiling_jobs} each)"):
            with lab.progress.bar("infer ceiling", sizes.ceiling_jobs, "req") as update:
                rate = await ceilings.infer_ceiling(
                    lab.stack.triton.grpc_url, decoded, sizes.ceiling_jobs, concurrency, update
                )
            doc["ceiling_infer_per_s"] = round(rate, 2)
            output = images.encode(decoded[0], "jpeg")
            storage_settings = lab.settings("ceiling-storage")
            with lab.progress.bar("storage ceiling", sizes.ceiling_jobs) as update:
                rate = await ceilings.storage_ceiling(
                    small.uris,
                    output=output,
                    buckets=storage_settings.allowed_output_buckets,
                    count=sizes.ceiling_jobs,
                    concurrency=concurrency,
                    progress=update,
                )
            doc["ceiling_storage_jobs_per_s"] = round(rate, 2)
            settings = lab.settings("ceiling-pubsub")
            async with JobClient(settings) as client:
                jobs = workload.make_jobs("ceiling-pubsub", small, sizes.ceiling_jobs)
                with lab.progress.bar("publish", len(jobs)) as update:
                    await workload.publish_backlog(client, jobs, update)
            with lab.progress.bar("pubsub ceiling", sizes.ceiling_jobs, "msg") as update:
                rate = await ceilings.pubsub_ceiling(
                    settings.subscription_path,
                    sizes.ceiling_jobs,
                    self.effective.max_messages,
                    update,
                    PUBSUB_CEILING_TIMEOUT_S,
                )
            doc["ceiling_pubsub_msgs_per_s"] = round(rate, 2)
            probe = lab.settings("pubsub-delivery")
            delays = await ceilings.pubsub_delivery_ms(
                probe.topic_path,
                probe.subscription_path,
                sizes.delivery_probes,
                sizes.low_rate_per_s,
                PUBSUB_CEILING_TIMEOUT_S,
            )
            doc["pubsub_delivery_ms"] = stats.summarize(delays)
            lab.progress.note(
                f"infer {doc['ceiling_infer_per_s']:.0f}/s, storage {doc['ceiling_storage_jobs_per_s']:.0f}/s, "
                f"pubsub {doc['ceiling_pubsub_msgs_per_s']:.0f}/s, "
                f"delivery {report.fmt_latency(doc['pubsub_delivery_ms'])} at {sizes.low_rate_per_s:g}/s"
            )

    async def _main_run(self) -> None:
        sizes, doc, lab = self.sizes, self.doc, self.lab
        async with self.phase(f"main run: backlog of {sizes.jobs} jobs at {sizes.image_px} px"):
            spy: list[profiler.PySpy] = []
            raw = self.opts.out_dir / "bench-worker.pyspy.txt"

            binary = profiler.executable() if self.opts.py_spy else None

            def attach(pid: int) -> profiler.PySpy:
                assert binary is not None
                spy.append(profiler.PySpy(binary, pid, raw))
                return spy[-1]

            if self.opts.py_spy and binary is None:
                lab.progress.note("py-spy not found: pip install py-spy; running without it")
            figures = await backlog_run(lab, RunSpec("main", sizes.jobs, sizes.image_px), attach if binary else None)
            doc.setdefault("runs", {})["main"] = figures.as_dict()
            doc["e2e_jobs_per_s"] = round(figures.jobs_per_s, 2)
            doc["worker_cpu_ms_per_job"] = _round(figures.cpu_ms_per_job)
            doc["worker_cpu_ms_per_job_steady"] = _round(figures.cpu_ms_per_job_steady)
            doc["stages_ms"] = figures.stages_ms
            doc["stack_cpu_ms_per_job"] = figures.stack_cpu_ms_per_job
            doc["worker_thread_cpu_ms_per_job"] = figures.thread_cpu_ms_per_job
            if figures.cpu_ms_per_job is not None:
                total = figures.cpu_ms_per_job + sum(figures.stack_cpu_ms_per_job.values())
                doc["machine_cpu_ms_per_job"] = round(total, 3)
                # All processes of the job share this machine's cores: the most they allow.
                doc["ceiling_machine_cpu_jobs_per_s"] = round((os.cpu_count() or 1) * 1000 / total, 1)
            doc["peak_rss_mb"] = round(figures.peak_rss_mb, 1)
            doc["redelivered"] = figures.redelivered
            doc["avg_batch_size"] = figures.avg_batch
            doc["largest_batch_seen"] = max(figures.batch_histogram, default=None)
            doc["batch_histogram"] = {str(k): v for k, v in figures.batch_histogram.items()}
            doc["service_ms"] = figures.service_ms
            doc["backlog_latency_ms"] = figures.latency_ms
            lab.progress.note(
                f"{figures.jobs_per_s:.1f} jobs/s, {figures.cpu_ms_per_job or 0:.2f} CPU ms/job, "
                f"avg batch {figures.avg_batch}"
            )
            if spy and raw.exists():
                own, inclusive = profiler.hottest(raw.read_text())
                doc["profile"] = {
                    "raw": str(raw),
                    "self": [h.__dict__ for h in own],
                    "inclusive": [h.__dict__ for h in inclusive],
                }

    async def _large(self, large: workload.Inputs) -> None:
        sizes, doc, lab = self.sizes, self.doc, self.lab
        has_setting = "shared_memory" in Settings.model_fields
        doc["large"] = {"image_px": sizes.large_px, "jobs": sizes.large_jobs, "shared_memory_setting": has_setting}
        async with self.phase(f"{sizes.large_px} px: {sizes.large_jobs} jobs, payloads and shared memory"):
            floor = await asyncio.to_thread(measure_floor, self.spec, large.images, max(8, sizes.floor_jobs // 10))
            doc["large"]["floor_cpu_ms_per_job"] = floor.cpu_ms_per_job
            variants = {"payload": {"TRITONQ_SHARED_MEMORY": "off"}, "shm": {"TRITONQ_SHARED_MEMORY": "auto"}}
            if not has_setting:
                lab.progress.note("the worker has no TRITONQ_SHARED_MEMORY yet: payloads only, shm is null")
                variants = {"payload": {}}
            for variant, env in variants.items():
                figures = await backlog_run(lab, RunSpec(f"large-{variant}", sizes.large_jobs, sizes.large_px, env))
                doc["large"][f"{variant}_cpu_ms_per_job"] = _round(figures.cpu_ms_per_job)
                doc["large"][f"{variant}_jobs_per_s"] = round(figures.jobs_per_s, 2)
                doc["large"][f"{variant}_peak_rss_mb"] = round(figures.peak_rss_mb, 1)
                doc["large"][f"{variant}_thread_cpu_ms_per_job"] = figures.thread_cpu_ms_per_job
                doc.setdefault("runs", {})[f"large_{variant}"] = figures.as_dict()
                lab.progress.note(f"{variant}: {figures.cpu_ms_per_job or 0:.2f} CPU ms/job")
            doc["large"].setdefault("shm_cpu_ms_per_job", None)

    async def _modes(self) -> None:
        sizes, doc, lab = self.sizes, self.doc, self.lab
        has_setting = "triton_mode" in Settings.model_fields
        doc["triton_modes"] = {"jobs": sizes.mode_jobs, "setting": has_setting}
        async with self.phase(f"stream against unary inference: {sizes.mode_jobs} jobs each"):
            if not has_setting:
                lab.progress.note("the worker has no TRITONQ_TRITON_MODE yet: both null")
                doc["triton_modes"].update(stream_jobs_per_s=None, unary_jobs_per_s=None)
                return
            for mode in ("stream", "unary"):
                spec = RunSpec(f"mode-{mode}", sizes.mode_jobs, sizes.image_px, {"TRITONQ_TRITON_MODE": mode})
                figures = await backlog_run(lab, spec)
                doc["triton_modes"][f"{mode}_jobs_per_s"] = round(figures.jobs_per_s, 2)
                doc["triton_modes"][f"{mode}_cpu_ms_per_job"] = _round(figures.cpu_ms_per_job)
                doc["triton_modes"][f"{mode}_avg_batch_size"] = figures.avg_batch
                doc.setdefault("runs", {})[f"mode_{mode}"] = figures.as_dict()
                lab.progress.note(f"{mode}: {figures.jobs_per_s:.1f} jobs/s")


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _limits(settings: Settings) -> images.DecodeLimits:
    return images.DecodeLimits(max_bytes=settings.max_input_bytes, max_pixels=settings.max_input_pixels)


async def _model_spec(triton_url: str) -> ModelSpec:
    control = TritonControl(triton_url)
    try:
        return await control.model_spec(sim_model.MODEL_NAME)
    finally:
        await control.close()


NOTES = (
    "e2e_jobs_per_s: jobs published ahead as a backlog, then the worker (`tritonq run`, a subprocess, "
    "default settings) started; from the first job's pull (its record's finish time less its stage timings) "
    "to the last record written (the ack follows at once).",
    "naive_jobs_per_s: bench/naive.py, one message at a time (synchronous pull, GCS over plain HTTP, one unary "
    "tritonclient.grpc call, encode, two uploads, ack), on fewer jobs than the main run since it is slow.",
    "worker_cpu_ms_per_job: user+sys CPU of the worker process (/proc/PID/stat) when its last job is done, less "
    "its CPU just before it took its first message (scraped every 0.05 s until then), over the jobs; "
    "worker_cpu_ms_per_job_steady is the slope of CPU against jobs done between 10% and 90% of the run, a "
    "cross-check that is biased low when the jobs are few against the in-flight limit. Both include the "
    "benchmark's scrapes of the worker's /metrics (every 1 s). worker_thread_cpu_ms_per_job splits the first "
    "by thread (/proc/PID/task): event_loop (the main thread: Pub/Sub, storage, gRPC calls, small images), "
    "python_threads (the image pool) and native_threads (grpc's own); a thread that exits before the end of the "
    "run drops out of the split, not of the total.",
    "floor_cpu_ms_per_job: ModelSpec.preprocess + postprocess of the same images in one thread, no I/O "
    "(thread CPU time); overhead_ratio = worker_cpu_ms_per_job / floor_cpu_ms_per_job.",
    "avg_batch_size: Triton's nv_inference_count / nv_inference_exec_count for sim_gpu over the main run; the batch "
    "histogram from Triton's statistics API; max_batch_size is the model's.",
    "latency_ms: publish to record written (JobResult.latency_ms, measured by the worker), with jobs paced at "
    "a fraction of e2e_jobs_per_s (a backlog's publish-to-ack is only its drain time, kept as backlog_latency_ms); "
    "service_ms: pull to record written (sum of the stage timings) in the main backlog.",
    "low_rate_latency_ms: publish to record written at 5 jobs/s; low_rate_target_ms = low_rate_floor_ms + 25 ms, "
    "where the latency floor is what a job waits for on a quiet system whatever the worker does: "
    "floor_cpu_ms_per_job + one batch-of-1 execution of the simulated GPU + the model's max queue delay + "
    "pubsub_delivery_ms p50 (measured alone in the same run; the emulator's streaming pull polls every 50 ms).",
    "ceiling_infer_per_s: the same decoded tensors sent through worker.triton.TritonStream at the worker's "
    "in-flight limit, no queue, no storage. ceiling_storage_jobs_per_s: one input read, a result and a record "
    "create-only write through worker.storage at the worker's in-flight limit. ceiling_pubsub_msgs_per_s: "
    "streaming pull + ack through worker.consumer with the worker's flow control. e2e_vs_ceiling uses the "
    "slowest of the three.",
    "pubsub_delivery_ms: publish (the emulator's publish time) to worker.consumer handing it out, at the low rate, "
    "probe messages alone: the share of low-rate latency Pub/Sub itself takes. low_rate_waiting_ms cross-checks "
    "it inside the low-rate run: each job's latency less its stage timings (publish to pull).",
    "stack_cpu_ms_per_job: CPU of each stack component's process group (/proc) during the main run, per job; "
    "machine_cpu_ms_per_job adds the worker's; ceiling_machine_cpu_jobs_per_s = CPUs x 1000 / that: the most "
    "this machine's cores allow with the emulators on them (not one of the three ceilings of e2e_vs_ceiling).",
    "Every run spreads its results over 16 output buckets of its own (jobs' output_prefix): the GCS emulator's "
    "memory backend spends CPU per write in proportion to the objects already in the bucket, which real GCS does "
    "not, and one bucket of 4,000 objects made storage the bottleneck of the benchmark.",
    "peak_rss_mb: VmHWM of the worker process in the main run.",
    "redelivered: copies of jobs already finished that the worker was handed again during the main run, "
    "found done by their record and acked (the worker's duplicate count): the emulator ignores the stream's "
    "flow control, and messages it pushed while the worker was not reading expire and come back. Their CPU is "
    "in worker_cpu_ms_per_job; the run counts as done when every job has finished once.",
    "sweep: a backlog per in-flight limit with TRITONQ_MAX_MESSAGES equal to it; the plot's latency is service_ms p99.",
    "large: 1024 px images, TRITONQ_SHARED_MEMORY=off (payloads in the gRPC messages) and =auto (system shared "
    "memory); null where the worker has no such setting.",
    "All processes share this machine's CPUs: the emulators, Triton, the benchmark and the worker compete, as the "
    "worker and Triton would in one pod.",
)


def main(argv: Sequence[str] | None = None) -> int:
    opts = options.parse(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    progress = Progress(PHASES)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(opts.state_dir / "logs")
    repository = sim_model.prepare_repository(opts.state_dir / "model_repository", opts.profile)
    config = sim_model.read_config((repository / sim_model.MODEL_NAME / "config.pbtxt").read_text())
    bench: Bench | None = None
    progress.phase("starting the stack: Pub/Sub emulator, GCS emulator, Triton with sim_gpu")
    with started_lab(opts.state_dir, repository, progress) as lab:
        effective = Settings()
        spec = asyncio.run(_model_spec(lab.stack.triton.grpc_url))
        bench = Bench(lab, opts, spec, effective)
        asyncio.run(bench.run())
    doc = _document(opts, config, bench, time.monotonic() - started)
    sweep = doc.get("sweep") or []
    png = None
    if sweep:
        png = plot.render(
            [p["max_in_flight"] for p in sweep],
            [p["jobs_per_s"] for p in sweep],
            [(p.get("service_ms") or {}).get("p99", 0.0) for p in sweep],
            f"tritonq: {opts.sizes.image_px} px jobs, sim_gpu {opts.profile.describe()}",
        )
    json_path, md_path = report.write(doc, opts.out_dir, png)
    print(report.table(doc))
    print(f"\nwrote {json_path} and {md_path} in {doc['wall_s']:.0f} s")
    for name, error in doc["errors"].items():
        print(f"phase failed: {name}: {error}", file=sys.stderr)
    return 1 if doc["errors"] else 0


def _document(
    opts: options.Options, config: sim_model.ModelConfig, bench: Bench | None, wall_s: float
) -> dict[str, Any]:
    measured = bench.doc if bench is not None else {"errors": {"stack": "the stack did not start"}}
    effective = bench.effective if bench is not None else Settings()
    doc: dict[str, Any] = {
        "command": opts.command,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": opts.quick,
        "wall_s": round(wall_s, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "sim_profile": {
            "fixed_ms": opts.profile.fixed_ms,
            "per_image_ms": opts.profile.per_image_ms,
            "text": opts.profile.describe(),
            "max_batch_size": config.max_batch_size,
            "preferred_batch_sizes": list(config.preferred_batch_sizes),
            "queue_delay_ms": config.queue_delay_ms,
        },
        "worker_settings": {
            "max_in_flight": effective.max_in_flight,
            "max_messages": effective.max_messages,
            "preprocess_threads": effective.thread_count,
        },
        "image_px": opts.sizes.image_px,
        "jobs": opts.sizes.jobs,
        "max_batch_size": config.max_batch_size,
        **measured,
        "notes": list(NOTES),
    }
    return report.derive(doc)
