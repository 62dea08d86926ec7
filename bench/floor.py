"""The physical floor: the job's unavoidable image work, alone, in a tight single-threaded loop.

The same images go through the same code the worker runs (``ModelSpec.preprocess``
to decode and lay out the tensor, ``ModelSpec.postprocess`` to encode the
model's output, here the identity of ``sim_gpu``) with no I/O, no event loop and
no threads. The figure is the CPU time of the loop's own thread per job: what
any worker, however clever, must spend.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from worker.config import Settings
from worker.images import DecodeLimits
from worker.models import ModelSpec


@dataclass(frozen=True)
class Floor:
    """CPU milliseconds per job of the image work, and its two halves."""

    cpu_ms_per_job: float
    preprocess_ms: float
    postprocess_ms: float
    jobs: int


def measure_floor(spec: ModelSpec, images: Sequence[bytes], jobs: int) -> Floor:
    """Preprocess and postprocess ``jobs`` images (cycling through ``images``) after one warm-up pass."""
    defaults = Settings.model_fields
    limits = DecodeLimits(
        max_bytes=int(defaults["max_input_bytes"].default), max_pixels=int(defaults["max_input_pixels"].default)
    )
    for data in images:  # warm-up: first calls load codecs and allocate
        prepared = spec.preprocess(data, limits, {})
        spec.postprocess(prepared.array, prepared, "")
    pre_s = post_s = 0.0
    for i in range(jobs):
        data = images[i % len(images)]
        start = time.thread_time()
        prepared = spec.preprocess(data, limits, {})
        middle = time.thread_time()
        # sim_gpu is the identity: its output is the input tensor, as the worker receives it.
        spec.postprocess(prepared.array, prepared, "")
        end = time.thread_time()
        pre_s += middle - start
        post_s += end - middle
    return Floor(
        cpu_ms_per_job=round((pre_s + post_s) * 1000 / jobs, 3),
        preprocess_ms=round(pre_s * 1000 / jobs, 3),
        postprocess_ms=round(post_s * 1000 / jobs, 3),
        jobs=jobs,
    )
