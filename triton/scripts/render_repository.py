"""Renders the Triton model repository for one deployment profile from a single source of truth.

This file owns every ``config.pbtxt``: ``MODELS`` below describes each model
once (tensors, batching, versions, per-profile tuning) and ``render_config``
turns it into Triton's text format for a profile:

- ``cpu``: KIND_CPU, one instance per model, the Python backend for everything
  (ONNX models through an onnxruntime wrapper, because the Triton in the
  ``nvidia-pytriton`` wheel has no onnxruntime backend). Its output *is* the
  committed ``triton/model_repository/``; a unit test fails if they differ.
- ``gpu``: one NVIDIA T4. ONNX models run on KIND_GPU with
  ``platform: "onnxruntime_onnx"`` and the TensorRT execution provider in FP16;
  more instances, larger preferred batches, longer queue delays, bounded queues
  with a timeout. The Python-backend image models compute with numpy on the
  CPU, so they stay KIND_CPU there (a GPU instance would only pin a device they
  never touch) with more instances, ready to move to KIND_GPU when a model
  gains a GPU implementation.

Code and weights are not duplicated: version folders are copied from the
committed repository, ONNX files are written by ``export_models.py``.

    python triton/scripts/render_repository.py --profile cpu --out triton/model_repository
    python triton/scripts/render_repository.py --profile gpu --out build/model_repository_gpu
    python triton/scripts/render_repository.py --check     # committed cpu configs up to date?
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_models  # sibling script, imported by path so both run as plain files

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMITTED = REPO_ROOT / "triton" / "model_repository"
PROFILES = ("cpu", "gpu")
MARKER = ".tritonq-profile"  # written into rendered repositories so --out may safely replace them

Profile = Literal["cpu", "gpu"]
Backend = Literal["python", "onnx", "ensemble"]
Kind = Literal["image", "embedding", "detections", "classification", "codec", "ensemble"]


class Enum(str):
    """A protobuf enum value: written bare (``TYPE_FP32``), not quoted."""


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # Triton's TYPE_* name
    dims: tuple[int, ...]


@dataclass(frozen=True)
class PerProfile:
    """A setting whose value depends on the profile."""

    cpu: Any
    gpu: Any

    def get(self, profile: Profile) -> Any:
        return self.cpu if profile == "cpu" else self.gpu


@dataclass(frozen=True)
class Batching:
    preferred: PerProfile
    delay_us: PerProfile
    priority: bool = True  # three priority levels, default the middle: the worker may raise or lower a job


@dataclass(frozen=True)
class Model:
    name: str
    kind: Kind
    backend: Backend
    max_batch_size: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    versions: tuple[int, ...] = (1,)
    batching: Batching | None = None
    instances: PerProfile = PerProfile(1, 1)
    gpu_device: bool = False  # KIND_GPU in the gpu profile (only where the computation is on the GPU)
    parameters: Mapping[str, PerProfile | str] = field(default_factory=dict)
    ensemble_steps: tuple[dict[str, Any], ...] = ()
    cuda_graphs: bool = False


def _image(name: str, channels_out: int = 3, versions: tuple[int, ...] = (1,)) -> Model:
    return Model(
        name=name,
        kind="image",
        backend="python",
        max_batch_size=16,
        inputs=(Tensor("image", "TYPE_UINT8", (-1, -1, 3)),),
        outputs=(Tensor("output", "TYPE_UINT8", (-1, -1, channels_out)),),
        versions=versions,
        batching=Batching(preferred=PerProfile([4, 8, 16], [8, 16]), delay_us=PerProfile(2000, 5000)),
        instances=PerProfile(1, 2),
    )


#: Repository kinds the worker serves jobs for, as the ``tritonq_kind`` config parameter.
#: Codec steps exist only inside the ensemble; the ensemble takes and returns encoded images.
WORKER_KINDS = {
    "image": "image",
    "embedding": "embedding",
    "classification": "classification",
    "detections": "detections",
    "ensemble": "encoded_image",
}

# The single source of truth: one entry per model of the repository.
MODELS: tuple[Model, ...] = (
    _image("upscale"),
    _image("enhance", versions=(1, 2)),
    _image("background_remove", channels_out=4),
    _image("style_comic"),
    _image("style_aged"),
    Model(
        name="embedding",
        kind="embedding",
        backend="onnx",
        max_batch_size=32,
        inputs=(Tensor("image", "TYPE_FP32", (3, 224, 224)),),
        outputs=(Tensor("embedding", "TYPE_FP32", (512,)),),
        batching=Batching(preferred=PerProfile([4, 8, 16, 32], [8, 16, 32]), delay_us=PerProfile(5000, 5000)),
        instances=PerProfile(1, 2),
        gpu_device=True,
        parameters={"intra_op_threads": PerProfile("1", "0")},
    ),
    Model(
        name="resnet50",
        kind="classification",
        backend="onnx",
        max_batch_size=32,
        inputs=(Tensor("input", "TYPE_FP32", (3, 224, 224)),),
        outputs=(Tensor("output", "TYPE_FP32", (1000,)),),
        batching=Batching(preferred=PerProfile([4, 8, 16], [8, 16, 32]), delay_us=PerProfile(2000, 4000)),
        instances=PerProfile(1, 2),
        gpu_device=True,
        # The worker normalises the input with ImageNet's mean and std, as real ResNet weights expect.
        parameters={"intra_op_threads": PerProfile("1", "0"), "tritonq_normalize": "imagenet"},
    ),
    Model(
        name="pcb_detector",
        kind="detections",
        backend="python",
        max_batch_size=8,
        inputs=(Tensor("images", "TYPE_FP32", (3, 640, 640)),),
        outputs=(Tensor("output", "TYPE_FP32", (25200, 85)),),
        batching=Batching(preferred=PerProfile([4, 8], [4, 8]), delay_us=PerProfile(100, 2000)),
        instances=PerProfile(1, 2),
    ),
    Model(
        name="image_decode",
        kind="codec",
        backend="python",
        max_batch_size=16,
        inputs=(Tensor("image_bytes", "TYPE_STRING", (1,)),),
        outputs=(Tensor("image", "TYPE_UINT8", (-1, -1, 3)),),
        batching=Batching(preferred=PerProfile([8, 16], [8, 16]), delay_us=PerProfile(500, 1000)),
        instances=PerProfile(1, 2),
        parameters={"max_pixels": "40000000"},
    ),
    Model(
        name="image_encode",
        kind="codec",
        backend="python",
        max_batch_size=16,
        inputs=(Tensor("image", "TYPE_UINT8", (-1, -1, 3)),),
        outputs=(Tensor("output_bytes", "TYPE_STRING", (1,)),),
        batching=Batching(preferred=PerProfile([8, 16], [8, 16]), delay_us=PerProfile(500, 1000)),
        instances=PerProfile(1, 2),
        parameters={"format": "png", "jpeg_quality": "92"},
    ),
    Model(
        name="enhance_bytes",
        kind="ensemble",
        backend="ensemble",
        max_batch_size=16,
        inputs=(Tensor("image_bytes", "TYPE_STRING", (1,)),),
        outputs=(Tensor("output_bytes", "TYPE_STRING", (1,)),),
        # Pinned to enhance v1 (the production version): the A/B split lives in the
        # worker's routing, and an ensemble silently following "latest" would bypass it.
        ensemble_steps=(
            {
                "model_name": "image_decode",
                "model_version": -1,
                "input_map": {"image_bytes": "image_bytes"},
                "output_map": {"image": "decoded"},
            },
            {
                "model_name": "enhance",
                "model_version": 1,
                "input_map": {"image": "decoded"},
                "output_map": {"output": "enhanced"},
            },
            {
                "model_name": "image_encode",
                "model_version": -1,
                "input_map": {"image": "enhanced"},
                "output_map": {"output_bytes": "output_bytes"},
            },
        ),
    ),
)

# gpu profile: how long a request may wait in a model's queue, and how many may wait,
# before Triton rejects it (the worker retries those as transient errors).
GPU_QUEUE_TIMEOUT_US = 10_000_000
GPU_MAX_QUEUE_SIZE = 256
TRT_WORKSPACE_BYTES = 1 << 30
TRT_CACHE_DIR = "/tmp/triton-trt-cache"  # an emptyDir in k8s: rebuilt engines survive container restarts
# Platforms whose backend honours `optimization { cuda { graphs: true } }` over dynamic batch sizes.
CUDA_GRAPH_PLATFORMS = frozenset({"tensorrt_plan"})


def model(name: str) -> Model:
    """The entry of ``MODELS`` called ``name``."""
    for m in MODELS:
        if m.name == name:
            return m
    raise KeyError(name)


def _platform(m: Model, profile: Profile) -> tuple[str, str]:
    """("backend" | "platform", value) for the model in this profile."""
    if m.backend == "ensemble":
        return "platform", "ensemble"
    if m.backend == "onnx" and profile == "gpu":
        return "platform", "onnxruntime_onnx"
    return "backend", "python"


def _tensors(tensors: Iterable[Tensor]) -> list[dict[str, Any]]:
    return [{"name": t.name, "data_type": Enum(t.data_type), "dims": list(t.dims)} for t in tensors]


def _trt_shapes(m: Model, batch: int) -> str:
    return ",".join(f"{t.name}:{'x'.join(str(d) for d in (batch, *t.dims))}" for t in m.inputs)


def config_dict(m: Model, profile: Profile) -> dict[str, Any]:
    """The model's config as nested dicts in Triton's field order (pbtxt is written from this)."""
    key, value = _platform(m, profile)
    cfg: dict[str, Any] = {"name": m.name, key: value, "max_batch_size": m.max_batch_size}
    cfg["input"] = _tensors(m.inputs)
    cfg["output"] = _tensors(m.outputs)
    if len(m.versions) > 1:
        cfg["version_policy"] = {"specific": {"versions": list(m.versions)}}
    if m.backend == "ensemble":
        cfg["ensemble_scheduling"] = {
            "step": [
                {
                    "model_name": s["model_name"],
                    "model_version": s["model_version"],
                    "input_map": [{"key": k, "value": v} for k, v in s["input_map"].items()],
                    "output_map": [{"key": k, "value": v} for k, v in s["output_map"].items()],
                }
                for s in m.ensemble_steps
            ]
        }
        if m.kind in WORKER_KINDS:
            cfg["parameters"] = [{"key": "tritonq_kind", "value": {"string_value": WORKER_KINDS[m.kind]}}]
        return cfg
    if m.batching is not None:
        b = m.batching
        batcher: dict[str, Any] = {
            "preferred_batch_size": list(b.preferred.get(profile)),
            "max_queue_delay_microseconds": b.delay_us.get(profile),
        }
        if b.priority:
            batcher["priority_levels"] = 3
            batcher["default_priority_level"] = 2
        # Both profiles honour a per-request timeout set by the worker; the gpu profile also
        # bounds the queue, so an overloaded pod sheds load quickly instead of piling latency.
        policy: dict[str, Any] = {"timeout_action": Enum("REJECT")}
        if profile == "gpu":
            policy["default_timeout_microseconds"] = GPU_QUEUE_TIMEOUT_US
        policy["allow_timeout_override"] = True
        if profile == "gpu":
            policy["max_queue_size"] = GPU_MAX_QUEUE_SIZE
        batcher["default_queue_policy"] = policy
        cfg["dynamic_batching"] = batcher
    on_gpu = profile == "gpu" and m.gpu_device
    group: dict[str, Any] = {"count": m.instances.get(profile), "kind": Enum("KIND_GPU" if on_gpu else "KIND_CPU")}
    if on_gpu:
        group["gpus"] = [0]
    cfg["instance_group"] = [group]
    if on_gpu and m.backend == "onnx":
        # TensorRT EP in FP16 (T4 tensor cores), one engine for the whole batch range, cached on disk.
        trt = {
            "precision_mode": "FP16",
            "max_workspace_size_bytes": str(TRT_WORKSPACE_BYTES),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": TRT_CACHE_DIR,
            "trt_profile_min_shapes": _trt_shapes(m, 1),
            "trt_profile_opt_shapes": _trt_shapes(m, max(m.batching.preferred.gpu) if m.batching else 1),
            "trt_profile_max_shapes": _trt_shapes(m, m.max_batch_size),
        }
        cfg["optimization"] = {
            "execution_accelerators": {
                "gpu_execution_accelerator": [
                    {"name": "tensorrt", "parameters": [{"key": k, "value": v} for k, v in trt.items()]}
                ]
            }
        }
    if m.cuda_graphs:
        platform = cfg.get("platform", cfg.get("backend"))
        if platform not in CUDA_GRAPH_PLATFORMS:
            raise ValueError(f"{m.name}: CUDA graphs are not valid for {platform} with dynamic batch sizes")
        if on_gpu:
            cfg.setdefault("optimization", {})["cuda"] = {"graphs": True}
    params = {k: (v.get(profile) if isinstance(v, PerProfile) else v) for k, v in m.parameters.items()}
    if m.kind in WORKER_KINDS:
        # The worker reads a model's kind from its config: a new model of a known kind needs no worker code.
        params["tritonq_kind"] = WORKER_KINDS[m.kind]
    if m.backend == "onnx" and profile == "gpu":
        params.pop("intra_op_threads", None)  # read by the cpu wrapper only
    if params:
        cfg["parameters"] = [{"key": k, "value": {"string_value": v}} for k, v in params.items()]
    if on_gpu and m.backend == "onnx":
        # Warm up at load: TensorRT builds its engine before the model reports READY,
        # not on the first real request.
        cfg["model_warmup"] = [
            {
                "name": "build_engine",
                "batch_size": 1,
                "inputs": [
                    {"key": t.name, "value": {"data_type": Enum(t.data_type), "dims": list(t.dims), "zero_data": True}}
                    for t in m.inputs
                ],
            }
        ]
    return cfg


def _scalar(v: Any) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {v!r} in pbtxt")


def _emit(cfg: Mapping[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    for key, value in cfg.items():
        if isinstance(value, Mapping):
            lines += [f"{pad}{key} {{", *_emit(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            lines.append(f"{pad}{key} [")
            for i, item in enumerate(value):
                comma = "," if i < len(value) - 1 else ""
                if set(item) == {"key", "value"} and not isinstance(item["value"], Mapping):
                    # Map entries with a scalar value read best on one line.
                    lines.append(f"{pad}  {{ key: {_scalar(item['key'])} value: {_scalar(item['value'])} }}{comma}")
                else:
                    lines += [f"{pad}  {{", *_emit(item, indent + 2), f"{pad}  }}{comma}"]
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def render_config(m: Model, profile: Profile) -> str:
    """The ``config.pbtxt`` text of one model for one profile."""
    header = [
        f"# {m.name} ({m.kind}), profile {profile}.",
        "# Generated by triton/scripts/render_repository.py: edit MODELS there, then run `make models`.",
    ]
    return "\n".join(header + _emit(config_dict(m, profile), 0)) + "\n"


def _version_files(m: Model, profile: Profile, source_dir: Path) -> list[Path]:
    """The files of a committed version folder that the profile's version folder holds.

    Everything but caches, so extra files a model.py reads (or a user's own model.onnx) travel
    with it; the gpu profile serves ONNX models natively, so their cpu wrapper stays behind.
    """
    files = sorted(p for p in source_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if m.backend == "onnx" and profile == "gpu":
        files = [p for p in files if p.name != "model.py"]
    return files


def render(profile: Profile, out: Path, source: Path = COMMITTED) -> list[Path]:
    """Writes the repository for ``profile`` into ``out``; returns the config files written.

    Rendering into the committed repository itself rewrites its configs only.
    Any other ``out`` is replaced whole, but only when it is empty or was
    rendered here before (it holds the marker file), so a mistyped path is
    never wiped.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    out = Path(out)
    in_place = out.resolve() == source.resolve()
    if not in_place:
        if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
            raise FileExistsError(f"{out} is not empty and was not rendered by this script: refusing to replace it")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / MARKER).write_text(profile + "\n")
    written = []
    for m in MODELS:
        model_dir = out / m.name
        model_dir.mkdir(parents=True, exist_ok=True)
        config = model_dir / "config.pbtxt"
        config.write_text(render_config(m, profile))
        written.append(config)
        for version in m.versions:
            vdir = model_dir / str(version)
            vdir.mkdir(exist_ok=True)
            if m.backend == "ensemble":
                # Triton needs a version folder even for an ensemble; git keeps no empty folder.
                (vdir / ".gitkeep").touch()
            if in_place:
                continue
            source_dir = source / m.name / str(version)
            for path in _version_files(m, profile, source_dir) if source_dir.is_dir() else []:
                shutil.copy2(path, vdir / path.name)
    if any(m.backend == "onnx" for m in MODELS):
        export_models.ensure_models(out)
    return written


def differences(source: Path = COMMITTED) -> list[str]:
    """Files of the committed repository that differ from a fresh cpu render (empty when in sync)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "repo"
        _render_configs_only(fresh)
        diffs = []
        for m in MODELS:
            a, b = fresh / m.name / "config.pbtxt", source / m.name / "config.pbtxt"
            if not b.is_file() or not filecmp.cmp(a, b, shallow=False):
                diffs.append(str(b))
        listed = {m.name for m in MODELS}
        diffs += [str(p) for p in sorted(source.iterdir()) if p.is_dir() and p.name not in listed]
        return diffs


def _render_configs_only(out: Path) -> None:
    for m in MODELS:
        (out / m.name).mkdir(parents=True, exist_ok=True)
        (out / m.name / "config.pbtxt").write_text(render_config(m, "cpu"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PROFILES, default="cpu")
    parser.add_argument("--out", type=Path, help="output repository (default: the committed one for cpu)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed cpu configs are stale")
    args = parser.parse_args(argv)
    if args.check:
        diffs = differences()
        for d in diffs:
            print(f"out of date: {d} (run `make models`)", file=sys.stderr)
        return 1 if diffs else 0
    out = args.out or (COMMITTED if args.profile == "cpu" else REPO_ROOT / "build" / "model_repository_gpu")
    for path in render(args.profile, out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
