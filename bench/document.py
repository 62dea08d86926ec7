"""The shape of ``bench.json``: each profile's figures with what they were measured with, the main one on top.

The main (T4-like) profile's figures sit at the top level, as they always have;
the fast profile's, measured on a stack of its own, under ``profiles.fast`` with
the same keys, so ``targets.derive`` computes the same ratios for both.
"""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from typing import Any

from bench import options
from bench.notes import NOTES
from bench.sim_model import ModelConfig, SimProfile
from worker.config import Settings, available_cpus


def profile_figures(
    profile: SimProfile,
    config: ModelConfig,
    measured: dict[str, Any],
    effective: Settings,
    sizes: options.Sizes,
) -> dict[str, Any]:
    """One profile's measured figures, with the profile and the worker settings they were measured with."""
    return {
        "sim_profile": {
            "fixed_ms": profile.fixed_ms,
            "per_image_ms": profile.per_image_ms,
            "instances": profile.instances,
            "text": profile.describe(),
            "max_batch_size": config.max_batch_size,
            "preferred_batch_sizes": list(config.preferred_batch_sizes),
            "queue_delay_ms": config.queue_delay_ms,
        },
        "worker_settings": {
            "max_in_flight": effective.max_in_flight,
            "max_messages": effective.max_messages,
            "image_threads": available_cpus(),
        },
        "image_px": sizes.image_px,
        "jobs": sizes.jobs,
        "max_batch_size": config.max_batch_size,
        **measured,
    }


def document(opts: options.Options, main: dict[str, Any]) -> dict[str, Any]:
    """The main profile's figures (``profile_figures``) at the top level, with how and where they were measured."""
    return {
        "command": opts.command,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": opts.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        **main,
        "notes": list(NOTES),
    }
