"""The benchmark's pure parts: numbers, metric parsing, /proc parsing, the profile, the report, the plot."""

from __future__ import annotations

import io
import os
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from bench import limits, options, plot, procstat, profiler, report, runs, stats, targets
from bench.runs import TritonSnapshot
from bench.sampling import Sample, baseline_sample
from bench.sim_model import MODEL_NAME, REPOSITORY, SimProfile, read_config, with_profile
from bench.workload import JobTiming
from worker.jobs import JobResult

WORKER_METRICS = """\
# HELP tritonq_jobs_total Jobs finished.
# TYPE tritonq_jobs_total counter
tritonq_jobs_total{model="sim_gpu",outcome="succeeded",version="1"} 1990.0
tritonq_jobs_total{model="sim_gpu",outcome="retried",version="1"} 4.0
tritonq_jobs_total{model="unknown",outcome="failed_permanent",version="default"} 3.0
tritonq_jobs_created{model="sim_gpu",outcome="succeeded",version="1"} 1.7e+09
"""
TRITON_METRICS = """\
nv_inference_count{model="sim_gpu",version="1"} 2000
nv_inference_exec_count{model="sim_gpu",version="1"} 160
nv_inference_count{model="sim_gpu_other",version="1"} 7
"""


def test_percentile_interpolates_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]
    assert stats.percentile(values, 50) == pytest.approx(50.5)
    assert stats.percentile(values, 99) == pytest.approx(99.01)
    assert stats.percentile([3.0], 95) == 3.0
    with pytest.raises(ValueError):
        stats.percentile([], 50)


def test_summarize() -> None:
    assert stats.summarize([]) is None
    summary = stats.summarize([10.0, 20.0, 30.0, 40.0])
    assert summary == {"p50": 25.0, "p95": 38.5, "p99": 39.7, "mean": 25.0}


def test_metric_sum_filters_by_name_and_labels() -> None:
    assert stats.metric_sum(WORKER_METRICS, "tritonq_jobs_total") == 1997.0
    assert stats.metric_sum(WORKER_METRICS, "tritonq_jobs_total", {"outcome": "succeeded"}) == 1990.0
    assert stats.jobs_finished(WORKER_METRICS) == {"succeeded": 1990.0, "failed_permanent": 3.0, "duplicate": 0.0}


def test_a_sample_counts_each_job_once_and_redeliveries_apart() -> None:
    text = WORKER_METRICS + (
        'tritonq_jobs_total{model="sim_gpu",outcome="duplicate",version="1"} 7.0\n'
        "tritonq_messages_held{} 5.0\ntritonq_jobs_in_flight{} 2.0\n"
    )
    sample = Sample.of(text, at=1.0, cpu_s=2.5)
    assert (sample.done, sample.redelivered, sample.busy, sample.cpu_s) == (1993.0, 7.0, 7.0, 2.5)


def test_triton_counts_average_batch() -> None:
    before = stats.TritonCounts(inferences=0, executions=0)
    after = stats.TritonCounts.parse(TRITON_METRICS, "sim_gpu")
    assert after == stats.TritonCounts(2000, 160)
    assert (after - before).avg_batch == 12.5
    assert stats.TritonCounts(0, 0).avg_batch is None
    assert stats.TritonCounts(0, 0).mean_ms() == {}


def test_triton_times_per_request_between_two_scrapes() -> None:
    durations = (
        'nv_inference_request_duration_us{model="sim_gpu",version="1"} 900000\n'
        'nv_inference_queue_duration_us{model="sim_gpu",version="1"} 100000\n'
        'nv_inference_compute_infer_duration_us{model="sim_gpu",version="1"} 700000\n'
        'nv_inference_queue_duration_us{model="sim_gpu_other",version="1"} 5\n'
    )
    before = stats.TritonCounts(1000, 100, 400_000, 50_000, 300_000)
    after = stats.TritonCounts.parse(TRITON_METRICS + durations, "sim_gpu")
    assert (after - before).mean_ms() == {"request": 0.5, "queue": 0.05, "compute": 0.4}


def test_batch_histogram_and_delta() -> None:
    def snapshot(counts: dict[int, int]) -> dict[str, Any]:
        entries = [{"batch_size": size, "compute_infer": {"count": n, "ns": 1}} for size, n in counts.items()]
        return {"model_stats": [{"name": MODEL_NAME, "batch_stats": entries}]}

    before = stats.batch_histogram(snapshot({1: 3, 16: 10}))
    after = stats.batch_histogram(snapshot({1: 3, 8: 2, 16: 40}))
    assert stats.histogram_delta(after, before) == {8: 2, 16: 30}


def test_steady_rate_leaves_out_start_and_tail() -> None:
    # 2 CPU seconds of start-up, then 5 ms per job.
    samples = [(0.0, 2.0)] + [(float(d), 2.0 + d * 0.005) for d in range(50, 1001, 50)]
    assert stats.steady_rate(samples, 1000) == pytest.approx(0.005)
    assert stats.steady_rate([(0.0, 1.0)], 1000) is None


def test_proc_parsers() -> None:
    # A command name with a space and a parenthesis, as /proc allows.
    stat = "4242 (python (x) 3) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 1000 0 0"
    assert procstat.parse_cpu_seconds(stat, ticks_per_s=100) == 3.0


def test_sim_profile_parse_and_config() -> None:
    assert SimProfile.parse("60+1") == SimProfile(60.0, 1.0)
    assert SimProfile.parse("8") == SimProfile(8.0, 0.0)
    assert SimProfile(60, 1).batch_ms(16) == 76.0
    assert SimProfile.parse("4+0.1x4") == SimProfile(4.0, 0.1, 4)
    for bad in ("fast", "-1+2", "4+0.1x0", "4+0.1xfour"):
        with pytest.raises(ValueError):
            SimProfile.parse(bad)
    text = (REPOSITORY / MODEL_NAME / "config.pbtxt").read_text()
    config = read_config(text)
    assert config.max_batch_size == 16
    assert config.preferred_batch_sizes == (8, 16)
    assert config.queue_delay_ms == 5.0
    changed = with_profile(text, SimProfile(7.5, 0.25))
    assert 'key: "fixed_ms"\n  value { string_value: "7.5" }' in changed
    assert 'key: "per_image_ms"\n  value { string_value: "0.25" }' in changed
    assert "count: 1\n" in changed
    assert "count: 4\n" in with_profile(text, SimProfile(4, 0.1, 4))
    with pytest.raises(ValueError):
        with_profile("max_batch_size: 4\n", SimProfile())


def test_job_timing_from_a_record() -> None:
    result = JobResult(
        job_id="main-00001",
        status=JobResult.SUCCEEDED,
        finished_at="2026-01-01T00:00:10.000Z",
        latency_ms=900.0,
        timings_ms={"fetch": 100.0, "infer": 300.0, "write": 100.0},
    )
    timing = JobTiming.of(result)
    assert timing.succeeded
    assert timing.service_ms == 500.0
    assert timing.finished_at - timing.started_at == pytest.approx(0.5)


def measured_doc() -> dict[str, Any]:
    return {
        "command": "python -m bench",
        "jobs": 2000,
        "image_px": 256,
        "machine": {"cpus": 2},
        "sim_profile": {"fixed_ms": 60.0, "per_image_ms": 1.0, "text": "60 ms + 1 ms/image", "queue_delay_ms": 5.0},
        "max_batch_size": 16,
        "e2e_jobs_per_s": 120.0,
        "naive_jobs_per_s": 12.0,
        "worker_cpu_ms_per_job": 3.0,
        "floor_cpu_ms_per_job": 1.5,
        "avg_batch_size": 12.0,
        "low_rate_latency_ms": {"p50": 90.0, "p95": 100.0, "p99": 110.0},
        "ceiling_infer_per_s": 150.0,
        "ceiling_storage_jobs_per_s": 300.0,
        "ceiling_pubsub_msgs_per_s": 1500.0,
        "ceiling_machine_cpu_jobs_per_s": 400.0,
        "peer_jobs_per_s": 100.0,
        "peer_cpu_ms_per_job": 6.0,
        "large": {"payload_cpu_ms_per_job": 20.0, "shm_cpu_ms_per_job": None, "floor_cpu_ms_per_job": 12.5},
        "sweep": [{"max_in_flight": 8, "jobs": 400, "jobs_per_s": 40.0, "service_ms": {"p50": 100.0, "p99": 200.0}}],
        "notes": ["a note"],
    }


def test_run_figures_split_latency_into_waiting_and_service() -> None:
    def timing(job_id: str, latency_ms: float, infer_ms: float) -> JobTiming:
        return JobTiming.of(
            JobResult(
                job_id=job_id,
                status=JobResult.SUCCEEDED,
                finished_at="2026-01-01T00:00:10.000Z",
                latency_ms=latency_ms,
                timings_ms={"fetch": 2.0, "infer": infer_ms},
            )
        )

    snapshot = TritonSnapshot(stats.TritonCounts(0, 0), {}, {})
    figures = runs.run_figures(
        SimpleNamespace(startup_cpu_s=1.0),  # type: ignore[arg-type]
        runs.RunSpec("low-rate", 3, 256),
        timings=[timing("a", 100.0, 68.0), timing("b", 110.0, 68.0), timing("c", 150.0, 98.0)],
        before=snapshot,
        after=snapshot,
        samples=[Sample(at=0.0, done=3, busy=0, nacked=0, cpu_s=1.5)],
        peak_rss_mb=100.0,
    )
    assert figures.waiting_ms is not None and figures.service_ms is not None
    assert [figures.waiting_ms[p] for p in ("p50", "mean")] == [40.0, 40.0]  # 30, 40, 50 ms publish to pull
    assert figures.service_ms["p50"] == 70.0
    assert figures.as_dict()["waiting_ms"] == figures.waiting_ms


def test_derive_ratios_and_targets() -> None:
    doc = targets.derive(measured_doc())
    assert doc["speedup_vs_naive"] == 10.0
    assert doc["overhead_ratio"] == 2.0
    assert doc["slowest_ceiling"] == "infer"
    assert doc["e2e_vs_ceiling"] == 0.8
    assert doc["e2e_vs_machine_ceiling"] == 0.3
    assert (doc["speedup_vs_peer"], doc["worker_cpu_vs_peer"]) == (1.2, 0.5)
    assert doc["low_rate_target_ms"] == 92.5
    assert (doc["large"]["payload_overhead_ratio"], doc["large"]["shm_overhead_ratio"]) == (1.6, None)
    met = {t["figure"]: t["met"] for t in doc["targets"]}
    assert met == {
        "speedup_vs_naive": True,
        "e2e_vs_ceiling": False,
        "speedup_vs_peer": True,
        "worker_cpu_vs_peer": False,
        "avg_batch_size": True,
        "low_rate_latency_ms.p50": True,
        "large.shm_cpu_cut": None,
        "large.shm_overhead_ratio": None,
        "profiles.fast.e2e_vs_machine_ceiling": None,
        "profiles.fast.speedup_vs_peer": None,
        "profiles.fast.worker_cpu_vs_peer": None,
        "profiles.fast.low_rate_latency_ms.p50": None,
        "emulators.gcs_steady": None,
        "emulators.pubsub_steady": None,
    }


def fast_profile() -> dict[str, Any]:
    return {
        "sim_profile": {"fixed_ms": 4.0, "per_image_ms": 0.1, "text": "4 ms + 0.1 ms/image, 4 instances"},
        "jobs": 2000,
        "image_px": 256,
        "max_batch_size": 16,
        "e2e_jobs_per_s": 360.0,
        "peer_jobs_per_s": 150.0,
        "worker_cpu_ms_per_job": 2.4,
        "peer_cpu_ms_per_job": 6.0,
        "floor_cpu_ms_per_job": 1.5,
        "ceiling_infer_per_s": 2000.0,
        "ceiling_storage_jobs_per_s": 500.0,
        "ceiling_pubsub_msgs_per_s": 1500.0,
        "ceiling_machine_cpu_jobs_per_s": 450.0,
        "low_rate_latency_ms": {"p50": 55.0, "p95": 70.0, "p99": 80.0},
        "pubsub_delivery_ms": {"p50": 25.0, "p95": 48.0, "p99": 50.0},
        "runs": {
            "main": {
                "stages_ms": {"fetch": 3.0, "infer": 9.5},
                "triton_ms": {"request": 7.4, "queue": 1.5, "compute": 5.0},
            }
        },
        "service_ms": {"p50": 150.0, "p95": 200.0, "p99": 250.0, "mean": 160.0},
        "worker_thread_cpu_ms_per_job": {"event_loop": 2.2, "python_threads": 0.1, "native_threads": 0.1},
        "worker_settings": {"max_in_flight": 64, "max_messages": 64},
        "errors": {},
    }


def test_derive_the_fast_profile_as_the_main_one_and_check_its_targets() -> None:
    doc = measured_doc()
    doc["profiles"] = {"fast": fast_profile()}
    fast = targets.derive(doc)["profiles"]["fast"]
    assert fast["e2e_vs_machine_ceiling"] == 0.8
    assert (fast["speedup_vs_peer"], fast["worker_cpu_vs_peer"]) == (2.4, 0.4)
    assert (fast["slowest_ceiling"], fast["e2e_vs_ceiling"]) == ("storage", 0.72)
    assert fast["littles_law_in_flight"] == 57.6  # 360 jobs/s x 0.16 s
    assert fast["event_loop_core_share"] == 0.79  # 360 jobs/s x 2.2 ms
    # image work 1.5 + a batch of one 4.1 + no queue delay given + delivery 25; the target 25 ms above
    assert (fast["low_rate_floor_ms"], fast["low_rate_target_ms"]) == (30.6, 55.6)
    met = {t["figure"]: t["met"] for t in doc["targets"]}
    assert met["profiles.fast.e2e_vs_machine_ceiling"] is True
    assert met["profiles.fast.speedup_vs_peer"] is False
    assert met["profiles.fast.worker_cpu_vs_peer"] is True
    assert met["profiles.fast.low_rate_latency_ms.p50"] is True
    fast["low_rate_latency_ms"]["p50"] = 56.0
    met = {t["figure"]: t["met"] for t in targets.derive(doc)["targets"]}
    assert met["profiles.fast.low_rate_latency_ms.p50"] is False


def test_the_table_shows_the_fast_profile_and_the_peer() -> None:
    doc = measured_doc()
    doc["profiles"] = {"fast": fast_profile()}
    table = report.table(targets.derive(doc))
    assert len({len(line) for line in table.splitlines()}) == 1
    assert "| fast: e2e_vs_machine_ceiling" in table and ">= 0.80 (met)" in table
    assert "| fast: speedup_vs_peer" in table and ">= 3.00 (MISSED)" in table
    assert "| speedup_vs_peer" in table and ">= 1.15 (met)" in table
    assert "3.00 / 6.00 (0.50)" in table
    assert "| fast: jobs in flight by Little's law (limit 64)" in table
    assert "| 9.5; 7.4 / 1.5 / 5.0 " in table
    assert "| fast main | 3.0 | 9.5 |" in report.markdown(doc, None)
    assert "| fast:" not in report.table(targets.derive(measured_doc()))


def test_emulator_rates_steady_is_the_slower_over_the_faster_in_either_order() -> None:
    doc = measured_doc()
    doc["emulators"] = {
        "start": {"gcs_uploads_per_s": 1000.0, "pubsub_round_trip_msgs_per_s": 3000.0},
        "end": {"gcs_uploads_per_s": 790.0, "pubsub_round_trip_msgs_per_s": 3500.0},
    }
    doc = targets.derive(doc)
    assert doc["emulators"]["gcs_steady"] == 0.79
    assert doc["emulators"]["pubsub_steady"] == 0.857
    met = {t["figure"]: t["met"] for t in doc["targets"]}
    assert (met["emulators.gcs_steady"], met["emulators.pubsub_steady"]) == (False, True)
    assert "1,000 / 790 (0.79)" in report.table(doc)


def test_low_rate_target_counts_pubsub_delivery_in_the_floor() -> None:
    doc = measured_doc()
    doc["pubsub_delivery_ms"] = {"p50": 28.0, "p95": 50.0, "p99": 52.0}
    doc["low_rate_latency_ms"] = {"p50": 110.0, "p95": 120.0, "p99": 130.0}
    doc = targets.derive(doc)
    assert doc["low_rate_floor_parts_ms"] == {
        "image_work": 1.5,
        "model_execution": 61.0,
        "queue_delay": 5.0,
        "pubsub_delivery": 28.0,
    }
    assert doc["low_rate_floor_ms"] == 95.5
    assert doc["low_rate_target_ms"] == 120.5
    assert {t["figure"]: t["met"] for t in doc["targets"]}["low_rate_latency_ms.p50"] is True
    doc["low_rate_latency_ms"]["p50"] = 121.0
    assert {t["figure"]: t["met"] for t in targets.derive(doc)["targets"]}["low_rate_latency_ms.p50"] is False
    assert "pubsub delivery 28.0" in report.table(doc)


def test_derive_with_nothing_measured() -> None:
    doc = targets.derive({"errors": {"stack": "did not start"}})
    assert doc["speedup_vs_naive"] is None and doc["e2e_vs_ceiling"] is None
    assert all(t["met"] is None for t in doc["targets"])
    assert "n/a" in report.table(doc)


def test_table_and_markdown() -> None:
    doc = targets.derive(measured_doc())
    table = report.table(doc)
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert "| speedup_vs_naive" in table and ">= 8.00 (met)" in table
    assert "<= 0.40 (MISSED)" in table
    assert "90 / 100 / 110 ms" in table
    markdown = report.markdown(doc, "bench.png")
    assert "![throughput and p99 latency" in markdown
    assert "| 8 | 400 | 40.00 | 100 / 200 |" in markdown
    assert "- a note" in markdown


def test_plot_is_a_png() -> None:
    png = plot.render([8, 16, 32, 64], [40.0, 70.0, 100.0, 110.0], [150.0, 220.0, 400.0, 800.0], "title")
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        assert image.size == (plot.WIDTH, plot.HEIGHT)
    with pytest.raises(ValueError):
        plot.render([8], [1.0, 2.0], [1.0], "mismatch")


def test_hottest_functions_from_collapsed_stacks() -> None:
    collapsed = "\n".join(
        [
            "process 1:main;run (worker/service.py:10);encode (worker/images.py:100) 30",
            "process 1:main;run (worker/service.py:10);decode (worker/images.py:50) 50",
            "process 1:main;run (worker/service.py:10) 20",
            "garbage line",
        ]
    )
    own, inclusive = profiler.hottest(collapsed, top=2)
    assert [(h.function, h.share) for h in own] == [
        ("decode (worker/images.py)", 0.5),
        ("encode (worker/images.py)", 0.3),
    ]
    assert inclusive[0].function == "run (worker/service.py)" and inclusive[0].share == 1.0
    assert [h.function for h in inclusive[1:]] == ["decode (worker/images.py)"]


def test_process_group_of_a_stat_line() -> None:
    stat = "4242 (tritonserver) S 1 4200 4200 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 1000 0 0"
    assert procstat.parse_pgid(stat) == 4200


def test_thread_cpu_splits_the_event_loop_the_python_threads_and_native_ones() -> None:
    def stat(tid: int, name: str, utime: int, stime: int) -> str:
        return f"{tid} ({name}) S 1 4200 4200 0 -1 4194560 100 0 0 0 {utime} {stime} 0 0 20 0 9 0 1000 0 0"

    stats_by_tid = {
        4242: stat(4242, "python", 300, 100),  # the main thread: its id is the process's
        4250: stat(4250, "python", 150, 50),  # the image pool's threads keep the process's name
        4251: stat(4251, "python", 100, 0),
        4260: stat(4260, "event_engine", 20, 10),  # grpc names its own
        4261: stat(4261, "a (b) c", 5, 5),  # a name with parentheses and spaces
    }
    split = procstat.thread_cpu_s(stats_by_tid, pid=4242)
    assert split == {"event_loop": 4.0, "python_threads": 3.0, "native_threads": 0.4}


def test_run_figures_split_cpu_by_thread_from_the_last_idle_sample() -> None:
    def sample(busy: float, done: float, loop_s: float, pool_s: float) -> Sample:
        threads = {"event_loop": loop_s, "python_threads": pool_s, "native_threads": 0.1}
        return Sample(at=0.0, done=done, busy=busy, nacked=0.0, cpu_s=loop_s + pool_s + 0.1, threads_cpu_s=threads)

    timings = [
        JobTiming.of(JobResult(job_id=job_id, status=JobResult.SUCCEEDED, finished_at=at, latency_ms=1.0))
        for job_id, at in (("a", "2026-01-01T00:00:10.000Z"), ("b", "2026-01-01T00:00:11.000Z"))
    ]
    snapshot = TritonSnapshot(stats.TritonCounts(0, 0), {}, {})
    figures = runs.run_figures(
        SimpleNamespace(startup_cpu_s=None),  # type: ignore[arg-type]
        runs.RunSpec("large", 100, 1024),
        timings=timings,
        before=snapshot,
        after=snapshot,
        samples=[sample(0, 0, 1.0, 0.0), sample(0, 0, 1.2, 0.0), sample(64, 0, 1.3, 0.2), sample(0, 100, 1.7, 1.2)],
        peak_rss_mb=100.0,
    )
    assert figures.thread_cpu_ms_per_job == {"event_loop": 5.0, "python_threads": 12.0, "native_threads": 0.0}
    assert figures.cpu_ms_per_job == pytest.approx(17.0)
    assert figures.as_dict()["thread_cpu_ms_per_job"] == figures.thread_cpu_ms_per_job


def test_cpu_baseline_is_the_last_sample_before_the_first_message() -> None:
    def sample(busy: float, done: float, cpu_s: float) -> Sample:
        return Sample(at=0.0, done=done, busy=busy, nacked=0.0, cpu_s=cpu_s)

    samples = [sample(0, 0, 1.2), sample(0, 0, 1.5), sample(64, 0, 1.6), sample(64, 10, 1.9)]
    assert baseline_sample(samples) is samples[1]
    assert baseline_sample([sample(64, 0, 1.6)]) is None


def test_schedstat_is_time_running_and_time_waiting_for_a_cpu() -> None:
    assert procstat.parse_schedstat("242131094 4409899019 802\n") == (0.242131094, 4.409899019)
    running, waiting = procstat.schedstat_seconds(os.getpid())
    assert running > 0 and waiting >= 0


def test_event_loop_share_of_the_run_from_the_baseline_to_the_last_sample() -> None:
    def sample(at: float, busy: float, done: float, sched: tuple[float, float]) -> Sample:
        return Sample(at=at, done=done, busy=busy, nacked=0.0, cpu_s=1.0, loop_sched_s=sched)

    done = JobResult(
        job_id="a", status=JobResult.SUCCEEDED, finished_at="2026-01-01T00:00:10Z", timings_ms={"infer": 9}
    )
    timings = [JobTiming.of(done)]
    snapshot = TritonSnapshot(stats.TritonCounts(0, 0), {}, {})
    samples = [sample(0.0, 0, 0, (0.5, 0.1)), sample(1.0, 0, 0, (0.6, 0.1)), sample(5.0, 0, 1, (3.6, 1.3))]
    figures = runs.run_figures(
        SimpleNamespace(startup_cpu_s=None),  # type: ignore[arg-type]
        runs.RunSpec("main", 1, 256),
        timings=timings,
        before=snapshot,
        after=snapshot,
        samples=samples,
        peak_rss_mb=100.0,
    )
    assert figures.event_loop_share == {"running": 0.75, "waiting_for_cpu": 0.3}


def test_options_run_the_fast_profile_unless_told_not_to() -> None:
    opts = options.parse([])
    assert opts.fast_profile == SimProfile(4.0, 0.1, 4)
    assert (opts.fast_sizes.jobs, opts.fast_sizes.ceiling_jobs) == (opts.sizes.jobs, 1000)
    quick = options.parse(["--quick", "--jobs", "120"])
    assert (quick.sizes.jobs, quick.fast_sizes.jobs) == (120, 120)
    assert options.parse(["--fast-profile", "none"]).fast_profile is None
    assert options.parse(["--fast-profile", "2+0.05x8"]).fast_profile == SimProfile(2.0, 0.05, 8)


def test_limits_summary_lists_every_round_of_every_variant() -> None:
    snapshot = TritonSnapshot(stats.TritonCounts(0, 0), {}, {})
    done = JobResult(
        job_id="a", status=JobResult.SUCCEEDED, finished_at="2026-01-01T00:00:10Z", timings_ms={"infer": 500}
    )
    figures = runs.run_figures(
        SimpleNamespace(startup_cpu_s=None),  # type: ignore[arg-type]
        runs.RunSpec("main", 1, 256),
        timings=[JobTiming.of(done)],
        before=snapshot,
        after=snapshot,
        samples=[Sample(at=0.0, done=0, busy=0, nacked=0, cpu_s=1.0, loop_sched_s=(0.0, 0.0))],
        peak_rss_mb=100.0,
    )
    row = limits.figures_of(figures)
    assert (row["jobs_per_s"], row["littles_law_in_flight"], row["infer_stage_ms"]) == (2.0, 1.0, 500.0)
    text = limits.summary(
        {
            "as is": [row, row],
            limits.TWO_PROCESSES: [{"jobs_per_s": 3.0, "cpu_ms_per_job": 2.5, "littles_law_in_flight": 9.0}],
        }
    )
    assert "| as is | 2.0, 2.0 |" in text
    assert "| two processes | 3.0 | 2.5 | None | 9.0 | None / None |" in text
