"""The command line of ``python -m bench`` and the sizes of a run (full, or ``--quick`` for development).

A run measures two simulated GPUs, each on its own stack: the main profile (T4-like,
every phase) and the fast one (a few milliseconds per batch, where the worker rather
than the GPU sets the pace), which runs only the phases its figures need, with
``FAST_SIZES``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.sim_model import PROFILE_ENV, SimProfile


@dataclass(frozen=True)
class Sizes:
    """How many jobs each phase runs."""

    jobs: int = 2000  # the main backlog, 256 px
    image_px: int = 256
    naive_jobs: int = 150  # the naive worker is slow: fewer jobs, same images
    floor_jobs: int = 300
    ceiling_jobs: int = 2000
    low_rate_jobs: int = 100
    low_rate_per_s: float = 5.0
    delivery_probes: int = 100  # Pub/Sub's own delivery latency, at the low rate (p50 of ~uniform 0-50 ms)
    saturation_fraction: float = 0.9  # latency at saturation: paced at this fraction of e2e throughput
    saturation_s: float = 15.0  # ... for this long
    sweep: tuple[int, ...] = (8, 16, 32, 64)
    sweep_jobs: int = 400
    large_px: int = 1024
    large_jobs: int = 400  # past the in-flight limit many times over: start-up costs (regions, pools) amortised
    mode_jobs: int = 1500  # stream against unary: their difference is a few percent, so not too few


FULL = Sizes()
QUICK = Sizes(
    jobs=300,
    naive_jobs=30,
    floor_jobs=60,
    ceiling_jobs=300,
    low_rate_jobs=20,
    delivery_probes=10,
    saturation_s=5.0,
    sweep=(8, 32),
    sweep_jobs=150,
    large_jobs=40,
    mode_jobs=120,
)


#: The fast profile's sizes: only ceilings, low rate, the main backlog, the peer and saturation run there.
FAST_SIZES = dataclasses.replace(FULL, ceiling_jobs=1000, low_rate_jobs=50, delivery_probes=50, saturation_s=10.0)
FAST_QUICK = QUICK
#: The fast profile: 4 ms + 0.1 ms per image, four instances (a fast GPU overlaps executions).
FAST_PROFILE = "4+0.1x4"


@dataclass(frozen=True)
class Options:
    sizes: Sizes
    quick: bool
    profile: SimProfile
    fast_profile: SimProfile | None  # None: the main profile only
    fast_sizes: Sizes
    out_dir: Path
    state_dir: Path
    py_spy: bool
    command: str


def parse(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the worker on the local stack with a simulated GPU; writes build/bench.{json,md,png}.",
    )
    parser.add_argument("--quick", action="store_true", help="small N everywhere (development; figures indicative)")
    parser.add_argument("--jobs", type=int, help="jobs of the main backlog run (default 2000, quick 300)")
    parser.add_argument(
        "--sim-profile",
        default=os.environ.get(PROFILE_ENV, "60+1"),
        help=f"simulated GPU time per batch, FIXED_MS+PER_IMAGE_MS (default 60+1, or ${PROFILE_ENV})",
    )
    parser.add_argument(
        "--fast-profile",
        default=FAST_PROFILE,
        help=f"the second simulated GPU, FIXED_MS+PER_IMAGE_MS[xINSTANCES] (default {FAST_PROFILE}); none: skip it",
    )
    parser.add_argument("--out", type=Path, default=Path("build"), help="folder of bench.json, bench.md, bench.png")
    parser.add_argument("--state-dir", type=Path, default=Path("build/bench-state"), help="stack state and logs")
    parser.add_argument(
        "--py-spy", action="store_true", help="profile the worker with py-spy during the main run (perturbs it)"
    )
    args = parser.parse_args(argv)
    sizes, fast_sizes = (QUICK, FAST_QUICK) if args.quick else (FULL, FAST_SIZES)
    if args.jobs:
        sizes = dataclasses.replace(sizes, jobs=args.jobs)
        fast_sizes = dataclasses.replace(fast_sizes, jobs=args.jobs)
    return Options(
        sizes=sizes,
        quick=args.quick,
        profile=SimProfile.parse(args.sim_profile),
        fast_profile=None if args.fast_profile == "none" else SimProfile.parse(args.fast_profile),
        fast_sizes=fast_sizes,
        out_dir=args.out.resolve(),
        state_dir=args.state_dir.resolve(),
        py_spy=args.py_spy,
        command=" ".join(["python -m bench", *(argv if argv is not None else [])]),
    )
