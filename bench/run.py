"""``python -m bench``: start the stack with the simulated GPU, run every phase, write the report.

Phases, in order, all on one stack (each run has its own topic and subscription), between two
probes of the emulators' own rates (``bench/emulators.py``):

1. the floor: the image work alone, in a tight loop; an idle worker's start-up CPU;
2. the ceilings: Triton, storage and Pub/Sub, each alone;
3. the naive worker on its own backlog;
4. the product worker at a low rate (5 jobs/s), for latency on a quiet system;
5. the product worker draining the main backlog (2,000 jobs): throughput, CPU, memory, batches;
6. the idiomatic peer (``bench/peer.py``) draining a backlog of the same jobs;
7. the product worker paced just under that throughput: latency at saturation;
8. the in-flight limit sweep (smaller backlogs), for the plot;
9. 1024 px images with and without shared memory;
10. streaming against unary inference.

Then phases 2, 4, 5, 6 and 7 on a second stack with the fast profile (``options.FAST_PROFILE``),
under ``profiles.fast``.

A phase that fails is recorded under ``errors`` and the next one runs, so a
broken phase costs its figures, not the report. Every process started here is
stopped in ``finally`` blocks (the stack's ``stop`` and the worker context).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import ceilings, document, emulators, options, plot, profiler, report, sim_model, stats, targets, workload
from bench.floor import measure_floor
from bench.naive import NaiveWorker
from bench.peer_run import peer_run
from bench.progress import Progress
from bench.runs import Lab, RunSpec, backlog_run, paced_run, started_lab
from worker import images
from worker.client import JobClient
from worker.config import Settings
from worker.models import ModelSpec
from worker.triton import TritonControl

PHASES = 12
#: Phases of the fast profile: its stack, the ceilings, low rate, main run, peer, saturation.
FAST_PHASES = 6
#: Seconds the Pub/Sub ceiling may take at worst.
PUBSUB_CEILING_TIMEOUT_S = 300.0


class Bench:
    """One profile's benchmark: the lab, the options, and the document the phases fill in.

    ``full=False`` runs only what the second profile's figures need (ceilings, low rate,
    main run, peer, saturation); ``inherited`` seeds its document with the main profile's
    figures that do not depend on the GPU (the floor).
    """

    def __init__(
        self,
        lab: Lab,
        opts: options.Options,
        sizes: options.Sizes,
        spec: ModelSpec,
        effective: Settings,
        *,
        full: bool = True,
        inherited: dict[str, Any] | None = None,
    ) -> None:
        self.lab = lab
        self.opts = opts
        self.sizes = sizes
        self.spec = spec
        self.effective = effective
        self.full = full
        self.doc: dict[str, Any] = {"errors": {}, **(inherited or {})}

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
        async with JobClient(self.effective) as client:
            small = await self.lab.inputs(client, sizes.image_px)
        decoded = [images.decode(data, _limits(self.effective)) for data in small.images]
        if not self.full:
            await self._ceilings(small, decoded)
            await self._low_rate()
            await self._main_run()
            await self._peer()
            await self._saturation()
            return
        await self._probe_emulators("start")
        async with JobClient(self.effective) as client:
            large = await self.lab.inputs(client, sizes.large_px)

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

        await self._low_rate()
        await self._main_run()
        await self._peer()
        await self._saturation()

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

    async def _low_rate(self) -> None:
        sizes, doc = self.sizes, self.doc
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

    async def _peer(self) -> None:
        sizes, doc = self.sizes, self.doc
        async with self.phase(f"idiomatic peer: a backlog of {sizes.jobs} jobs, as the main run"):
            figures = await peer_run(self.lab, RunSpec("peer", sizes.jobs, sizes.image_px))
            doc.setdefault("runs", {})["peer"] = figures.as_dict()
            doc["peer_jobs_per_s"] = round(figures.jobs_per_s, 2)
            doc["peer_cpu_ms_per_job"] = _round(figures.cpu_ms_per_job)
            doc["peer_avg_batch_size"] = figures.avg_batch
            doc["peer_stack_cpu_ms_per_job"] = figures.stack_cpu_ms_per_job
            self.lab.progress.note(
                f"peer {figures.jobs_per_s:.1f} jobs/s, {figures.cpu_ms_per_job or 0:.2f} CPU ms/job, "
                f"avg batch {figures.avg_batch}"
            )

    async def _saturation(self) -> None:
        sizes, doc = self.sizes, self.doc
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

    async def _probe_emulators(self, when: str) -> None:
        """The emulators' own rates, so the report shows whether the stack slowed as the runs filled it."""
        rates = await asyncio.to_thread(
            emulators.probe, self.lab.stack, self.effective.project, warm_up=when == "start"
        )
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


def main(argv: Sequence[str] | None = None) -> int:
    opts = options.parse(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    progress = Progress(PHASES + (FAST_PHASES if opts.fast_profile else 0))
    doc = document.document(opts, _bench_profile(opts, progress, opts.profile, opts.sizes, opts.state_dir))
    if opts.fast_profile is not None:
        state_dir = opts.state_dir.with_name(f"{opts.state_dir.name}-fast")
        inherited = {"floor_cpu_ms_per_job": doc.get("floor_cpu_ms_per_job")}
        try:
            fast = _bench_profile(opts, progress, opts.fast_profile, opts.fast_sizes, state_dir, inherited)
        except Exception as exc:  # noqa: BLE001 - the fast profile's stack failing must not lose the main figures
            doc["errors"]["fast profile"] = f"{type(exc).__name__}: {exc}"
        else:
            doc["profiles"] = {"fast": fast}
            doc["errors"].update({f"fast: {name}": error for name, error in fast["errors"].items()})
    doc["wall_s"] = round(time.monotonic() - started, 1)
    targets.derive(doc)
    title = f"tritonq: {opts.sizes.image_px} px jobs, sim_gpu {opts.profile.describe()}"
    png = plot.sweep_png(doc.get("sweep") or [], title)
    json_path, md_path = report.write(doc, opts.out_dir, png)
    print(report.table(doc))
    print(f"\nwrote {json_path} and {md_path} in {doc['wall_s']:.0f} s")
    for name, error in doc["errors"].items():
        print(f"phase failed: {name}: {error}", file=sys.stderr)
    return 1 if doc["errors"] else 0


def _bench_profile(  # noqa: PLR0917 - the profile's parts, each passed once from main
    opts: options.Options,
    progress: Progress,
    profile: sim_model.SimProfile,
    sizes: options.Sizes,
    state_dir: Path,
    inherited: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start a stack with ``profile`` in ``state_dir``, run its phases (all without ``inherited``), its figures."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(state_dir / "logs")
    repository = sim_model.prepare_repository(state_dir / "model_repository", profile)
    config = sim_model.read_config((repository / sim_model.MODEL_NAME / "config.pbtxt").read_text())
    progress.phase(f"starting the stack: Pub/Sub emulator, GCS emulator, Triton with sim_gpu {profile.describe()}")
    with started_lab(state_dir, repository, progress) as lab:
        spec = asyncio.run(_model_spec(lab.stack.triton.grpc_url))
        bench = Bench(lab, opts, sizes, spec, Settings(), full=inherited is None, inherited=inherited)
        asyncio.run(bench.run())
    return document.profile_figures(profile, config, bench.doc, bench.effective, sizes)
