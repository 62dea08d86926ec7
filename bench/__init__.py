"""``python -m bench``: the benchmark of the worker, on the embedded local stack.

It measures the product worker (``tritonq run``, as a subprocess so its CPU and
memory are its own) against a naive worker, the idiomatic peer a user would
write, the physical floor of the image work, and the ceilings of each component,
with a simulated GPU model (``sim_gpu``) in Triton, at two profiles (T4-like and
fast, each on its own stack), and writes ``build/bench.json`` and ``build/bench.md``.

Modules, one concern each:

| module | owns |
| --- | --- |
| ``options.py`` | the command line and the run's sizes (full and ``--quick``) |
| ``sim_model.py`` | the simulated-GPU profile and the model repository Triton loads |
| ``stats.py`` | pure numbers: percentiles, Prometheus text, Triton batch statistics |
| ``procstat.py`` | CPU time and peak RSS of a process, from ``/proc`` |
| ``workload.py`` | inputs, jobs, publishing (backlog or paced), reading result records |
| ``sampling.py`` | the product worker (``devstack.worker_process``) sampled while it works |
| ``runs.py`` | one backlog or paced run of the product worker, reduced to figures |
| ``floor.py`` | the unavoidable image work in a tight loop |
| ``naive.py`` | the naive one-message-at-a-time worker |
| ``peer.py`` | the idiomatic peer: Google's and NVIDIA's clients on callback threads |
| ``peer_run.py`` | the peer as a subprocess on a backlog, reduced to a run's figures |
| ``limits.py`` | ``python -m bench.limits``: the fast profile's levers, one at a time, in rounds |
| ``ceilings.py`` | Triton, storage and Pub/Sub alone |
| ``targets.py`` | the derived figures of each profile and the targets |
| ``document.py`` | the shape of ``bench.json``: each profile's figures, the main one on top |
| ``notes.py`` | how each figure is measured |
| ``report.py`` | the summary table, ``bench.json`` and ``bench.md`` |
| ``plot.py`` | the PNG of throughput and p99 latency against the in-flight limit (Pillow) |
| ``run.py`` | the phases in order, the progress display, ``main`` |
"""
