"""The simulated GPU: its profile, and the model repository Triton loads for the benchmark.

``bench/model_repository/sim_gpu`` is a Python-backend identity model on UINT8
``[H, W, 3]`` images whose execution sleeps ``fixed_ms + per_image_ms x images``
per batch (default 60 ms + 1 ms per image, T4-like: the fixed cost dominates,
so a batch of 16 costs little more than a batch of 1). The profile is a
setting of the benchmark (``--sim-profile`` or ``TRITONQ_BENCH_SIM_PROFILE``,
``FIXED_MS+PER_IMAGE_MS[xINSTANCES]``); ``prepare_repository`` copies the repository into
the run's state folder with the profile written into the model's config, so
the checked-in repository always loads as it is. ``INSTANCES`` (default 1) is the
model's instance count: a fast GPU overlaps one batch's transfers and launch with
another's execution, and several instances keep the Python backend's own
per-execution overhead from serialising a profile of a few milliseconds.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

MODEL_NAME = "sim_gpu"
REPOSITORY = Path(__file__).resolve().parent / "model_repository"
PROFILE_ENV = "TRITONQ_BENCH_SIM_PROFILE"

_PARAM_RE = r'(key:\s*"{key}"\s*value\s*\{{\s*string_value:\s*")[^"]*(")'


@dataclass(frozen=True)
class SimProfile:
    """Execution time of one batch: ``fixed_ms + per_image_ms x batch``, in milliseconds."""

    fixed_ms: float = 60.0
    per_image_ms: float = 1.0
    instances: int = 1

    @classmethod
    def parse(cls, text: str) -> SimProfile:
        """``"60+1"`` (fixed + per image, in ms), or ``"4+0.1x4"`` (and four model instances)."""
        times, sep_x, instances = text.partition("x")
        fixed, sep, per_image = times.partition("+")
        try:
            profile = cls(float(fixed), float(per_image) if sep else 0.0, int(instances) if sep_x else 1)
        except ValueError as exc:
            raise ValueError(
                f"sim profile {text!r}: expected FIXED_MS+PER_IMAGE_MS[xINSTANCES], e.g. 60+1 or 4+0.1x4"
            ) from exc
        if profile.fixed_ms < 0 or profile.per_image_ms < 0:
            raise ValueError(f"sim profile {text!r}: times must be >= 0")
        if profile.instances < 1:
            raise ValueError(f"sim profile {text!r}: at least one instance")
        return profile

    def batch_ms(self, batch: int) -> float:
        return self.fixed_ms + self.per_image_ms * batch

    def describe(self) -> str:
        instances = f", {self.instances} instances" if self.instances > 1 else ""
        return f"{self.fixed_ms:g} ms + {self.per_image_ms:g} ms/image per batch (slept){instances}"


@dataclass(frozen=True)
class ModelConfig:
    """What the benchmark reads back from the model's ``config.pbtxt``."""

    max_batch_size: int
    queue_delay_ms: float
    preferred_batch_sizes: tuple[int, ...]


def read_config(text: str) -> ModelConfig:
    """The batching figures of a ``config.pbtxt`` (text format; only the fields the report states)."""
    max_batch = re.search(r"^max_batch_size:\s*(\d+)", text, re.M)
    delay = re.search(r"max_queue_delay_microseconds:\s*(\d+)", text)
    preferred = re.search(r"preferred_batch_size:\s*\[([^\]]*)\]", text)
    if max_batch is None:
        raise ValueError("config has no max_batch_size")
    return ModelConfig(
        max_batch_size=int(max_batch.group(1)),
        queue_delay_ms=int(delay.group(1)) / 1000.0 if delay else 0.0,
        preferred_batch_sizes=tuple(int(p) for p in preferred.group(1).split(",")) if preferred else (),
    )


def with_profile(text: str, profile: SimProfile) -> str:
    """``config.pbtxt`` text with the profile's two parameters and its instance count set."""
    for key, value in (("fixed_ms", profile.fixed_ms), ("per_image_ms", profile.per_image_ms)):
        text, count = re.subn(_PARAM_RE.format(key=key), rf"\g<1>{value:g}\g<2>", text)
        if count != 1:
            raise ValueError(f"config.pbtxt has no single {key} parameter")
    text, count = re.subn(r"(instance_group\s*\[\s*\{\s*count:\s*)\d+", rf"\g<1>{profile.instances}", text)
    if count != 1:
        raise ValueError("config.pbtxt has no single instance_group count")
    return text


#: What ``priorities=True`` adds to the batcher: three levels as the image models have, 2 by default.
PRIORITY_LEVELS = "  priority_levels: 3\n  default_priority_level: 2\n"


def prepare_repository(
    target: Path, profile: SimProfile, source: Path = REPOSITORY, *, priorities: bool = False
) -> Path:
    """Copy ``source`` to ``target`` (replacing it) with ``profile`` in the model's config; returns ``target``.

    ``priorities`` adds priority levels (``python -m bench.priority``). The throughput runs leave them
    out: with them on, Triton 2.51 crashed once (SIGSEGV in ``TRITONSERVER_InferenceRequestDelete``)
    under the ceiling phase's 2,000-request burst on this sleeping model; the same burst on the image
    models, which have priority levels, did not crash it.
    """
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    config = target / MODEL_NAME / "config.pbtxt"
    text = with_profile(config.read_text(), profile)
    if priorities:
        text = text.replace("  default_queue_policy {", PRIORITY_LEVELS + "  default_queue_policy {", 1)
    config.write_text(text)
    return target
