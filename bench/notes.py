"""How each figure of ``bench.json`` is measured: the notes ``bench.md`` ends with."""

from __future__ import annotations

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
    "Every run spreads its results over 16 output buckets of its own (jobs' output_prefix), as a peer or a "
    "later run must not inherit a fuller bucket. emulators: each emulator's own rate at the start (after a "
    "warm-up) and at the end of the benchmark (bench/emulators.py); *_steady is the slower over the faster.",
    "peak_rss_mb: VmHWM of the worker process in the main run.",
    "peer_jobs_per_s, peer_cpu_ms_per_job: bench/peer.py, the idiomatic peer (its own process): google-cloud-pubsub "
    "subscribe() with FlowControl(max_messages=64) and 64 callback threads, one shared tritonclient.grpc client "
    "doing blocking infer, one shared google-cloud-storage client (a connection pool of 64) for the read and the two "
    "create-only writes (if_generation_match=0), Pillow decode and encode (JPEG quality 90). It writes the same "
    "results and records as the worker, on a backlog of the same jobs and size as the main run, to output buckets "
    "of its own; its throughput and CPU per job are measured as the worker's (CPU baseline: clients built, not yet "
    "subscribed). speedup_vs_peer = e2e_jobs_per_s / peer_jobs_per_s; worker_cpu_vs_peer = worker_cpu_ms_per_job / "
    "peer_cpu_ms_per_job.",
    "e2e_vs_machine_ceiling = e2e_jobs_per_s / ceiling_machine_cpu_jobs_per_s: how close the worker comes to what "
    "the machine's cores allow with every process of the job on them.",
    "profiles.fast (rows marked fast:): a second stack whose sim_gpu sleeps 4 ms + 0.1 ms/image per batch with four "
    "model instances (a fast GPU overlaps executions, and one Python-backend instance would add its own per-execution "
    "overhead in series); it runs the ceilings, the low rate, the main backlog, the peer and saturation only, with "
    "the sizes of options.FAST_SIZES; its low-rate floor takes the main profile's image-work floor.",
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
