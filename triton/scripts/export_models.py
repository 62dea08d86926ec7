"""Builds the ONNX files of the model repository, reproducibly, from fixed seeds.

This file owns the ONNX graphs served by Triton: ``embedding`` (the OpenCLIP
ViT-B-32 interface) and ``resnet50`` (the ResNet-50 classifier interface).
Both are small networks written with ``onnx.helper`` whose weights come from a
seeded ``numpy`` generator, so the same source always yields the same bytes.
They are stand-ins for real weights: nothing is ever downloaded. A user who has
trained weights drops their own ``model.onnx`` in the version folder instead,
keeping the tensor names and shapes of the contract.

The files are written to ``<repo>/<model>/<version>/model.onnx`` and are
git-ignored. ``ensure_models`` is idempotent and cheap (a file that already has
the expected bytes is left alone), so the local stack can call it before every
Triton start::

    python triton/scripts/export_models.py                  # the committed cpu repository
    python triton/scripts/export_models.py --repository build/x   # any other repository
    python triton/scripts/export_models.py --check          # exit 1 if a file is missing or stale
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REPOSITORY = REPO_ROOT / "triton" / "model_repository"

# Pinned so the bytes do not depend on the installed onnx version's defaults.
OPSET = 17
IR_VERSION = 8
PRODUCER = "tritonq-export"

EMBEDDING_SEED = 2
RESNET_SEED = 4

# OpenCLIP's preprocessing constants, folded into the embedding graph so that the
# input contract stays the seed's "CHW float in [0, 1]".
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _const(name: str, value: NDArray[Any]) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value), name)


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> NDArray[Any]:
    """He-normal initialisation: keeps activations in a sane range through the stack."""
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))).astype(np.float32)


def _make_model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build_embedding() -> onnx.ModelProto:
    """OpenCLIP ViT-B-32 interface: ``image`` FP32 [N,3,224,224] in [0,1] -> ``embedding`` FP32 [N,512], L2-normalised.

    A ViT-shaped network in miniature: 32x32 patch embedding (as in ViT-B-32),
    layer norm, one residual token MLP, mean pooling over the 49 patch tokens,
    a projection to 512 dimensions and L2 normalisation inside the graph.
    """
    rng = np.random.default_rng(EMBEDDING_SEED)
    width, hidden, dim, patch = 128, 256, 512, 32
    inits = [
        _const("mean", np.array(CLIP_MEAN, np.float32).reshape(1, 3, 1, 1)),
        _const("std", np.array(CLIP_STD, np.float32).reshape(1, 3, 1, 1)),
        _const("patch_w", _he(rng, (width, 3, patch, patch), 3 * patch * patch)),
        _const("patch_b", np.zeros(width, np.float32)),
        _const("tokens_shape", np.array([0, width, -1], np.int64)),
        _const("ln1_g", np.ones(width, np.float32)),
        _const("ln1_b", np.zeros(width, np.float32)),
        _const("fc1_w", _he(rng, (width, hidden), width)),
        _const("fc1_b", np.zeros(hidden, np.float32)),
        _const("fc2_w", _he(rng, (hidden, width), hidden) * np.float32(0.5)),
        _const("fc2_b", np.zeros(width, np.float32)),
        _const("ln2_g", np.ones(width, np.float32)),
        _const("ln2_b", np.zeros(width, np.float32)),
        _const("proj_w", _he(rng, (width, dim), width)),
        _const("eps", np.array([1e-12], np.float32)),
    ]
    nodes = [
        helper.make_node("Sub", ["image", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normed"]),
        helper.make_node("Conv", ["normed", "patch_w", "patch_b"], ["patches"], strides=[patch, patch]),
        helper.make_node("Reshape", ["patches", "tokens_shape"], ["tokens_cf"]),  # [N, C, 49]
        helper.make_node("Transpose", ["tokens_cf"], ["tokens"], perm=[0, 2, 1]),  # [N, 49, C]
        helper.make_node("LayerNormalization", ["tokens", "ln1_g", "ln1_b"], ["t_ln"], axis=-1),
        helper.make_node("MatMul", ["t_ln", "fc1_w"], ["h_mm"]),
        helper.make_node("Add", ["h_mm", "fc1_b"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("MatMul", ["h", "fc2_w"], ["m_mm"]),
        helper.make_node("Add", ["m_mm", "fc2_b"], ["m"]),
        helper.make_node("Add", ["tokens", "m"], ["res"]),
        helper.make_node("ReduceMean", ["res"], ["pooled"], axes=[1], keepdims=0),  # [N, C]
        helper.make_node("LayerNormalization", ["pooled", "ln2_g", "ln2_b"], ["p_ln"], axis=-1),
        helper.make_node("MatMul", ["p_ln", "proj_w"], ["feat"]),  # [N, 512]
        helper.make_node("ReduceL2", ["feat"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe_norm"]),
        helper.make_node("Div", ["feat", "safe_norm"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
        initializer=inits,
    )
    return _make_model(graph, "OpenCLIP ViT-B-32 interface, fixed-seed stand-in weights (seed 2).")


def build_resnet50() -> onnx.ModelProto:
    """ResNet-50 interface: ``input`` FP32 [N,3,224,224] (ImageNet-normalised) -> ``output`` FP32 [N,1000] logits.

    A ResNet-shaped network in miniature (7x7/2 stem, max pool, one residual
    basic block, a strided conv, global average pool, fully connected layer),
    with fixed-seed weights standing in for the user's trained ones.
    """
    rng = np.random.default_rng(RESNET_SEED)
    c1, c2, classes = 32, 64, 1000
    inits = [
        _const("stem_w", _he(rng, (c1, 3, 7, 7), 3 * 49)),
        _const("stem_b", np.zeros(c1, np.float32)),
        _const("b1_w", _he(rng, (c1, c1, 3, 3), c1 * 9)),
        _const("b1_b", np.zeros(c1, np.float32)),
        _const("b2_w", _he(rng, (c1, c1, 3, 3), c1 * 9) * np.float32(0.5)),
        _const("b2_b", np.zeros(c1, np.float32)),
        _const("down_w", _he(rng, (c2, c1, 3, 3), c1 * 9)),
        _const("down_b", np.zeros(c2, np.float32)),
        _const("fc_w", _he(rng, (classes, c2), c2)),
        _const("fc_b", (rng.standard_normal(classes, dtype=np.float32) * np.float32(0.01)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "stem_w", "stem_b"], ["s"], strides=[2, 2], pads=[3, 3, 3, 3]),
        helper.make_node("Relu", ["s"], ["s_r"]),
        helper.make_node("MaxPool", ["s_r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p", "b1_w", "b1_b"], ["b1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b1"], ["b1_r"]),
        helper.make_node("Conv", ["b1_r", "b2_w", "b2_b"], ["b2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["p", "b2"], ["res"]),
        helper.make_node("Relu", ["res"], ["res_r"]),
        helper.make_node("Conv", ["res_r", "down_w", "down_b"], ["d"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["d_r"]),
        helper.make_node("GlobalAveragePool", ["d_r"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "resnet50",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])],
        initializer=inits,
    )
    return _make_model(graph, "ResNet-50 interface, fixed-seed stand-in weights (seed 4).")


# (model name, version) -> builder. The single list of ONNX files in the repository.
ONNX_MODELS: dict[tuple[str, int], Callable[[], onnx.ModelProto]] = {
    ("embedding", 1): build_embedding,
    ("resnet50", 1): build_resnet50,
}


def model_bytes(name: str, version: int = 1) -> bytes:
    """The exact bytes of one ONNX file (deterministic: same source, same bytes)."""
    return ONNX_MODELS[(name, version)]().SerializeToString(deterministic=True)


def onnx_path(repo: Path, name: str, version: int = 1) -> Path:
    return repo / name / str(version) / "model.onnx"


#: Mode of the written ONNX files: mkstemp creates 0600, but Triton reads them under its own uid.
MODEL_FILE_MODE = 0o644


def _write_atomically(path: Path, data: bytes) -> None:
    # A Triton starting concurrently must never see a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".model.", suffix=".tmp")
    try:
        os.fchmod(fd, MODEL_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stale_models(repo: Path) -> list[Path]:
    """ONNX files of ``repo`` that are missing or differ from what this script builds."""
    stale = []
    for name, version in ONNX_MODELS:
        path = onnx_path(repo, name, version)
        if not path.is_file() or path.read_bytes() != model_bytes(name, version):
            stale.append(path)
    return stale


def ensure_models(repo: Path = DEFAULT_REPOSITORY) -> None:
    """Writes every ONNX file of ``repo`` that is missing or stale; leaves identical ones untouched."""
    repo = Path(repo)
    for name, version in ONNX_MODELS:
        if not (repo / name).is_dir():
            raise FileNotFoundError(f"{repo / name} does not exist: is {repo} a tritonq model repository?")
        path = onnx_path(repo, name, version)
        data = model_bytes(name, version)
        if path.is_file() and path.read_bytes() == data:
            continue
        _write_atomically(path, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repository", "--repo", dest="repo", type=Path, default=DEFAULT_REPOSITORY, help="model repository root"
    )
    parser.add_argument("--check", action="store_true", help="only report missing or stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_models(args.repo)
        for path in stale:
            print(f"stale or missing: {path}", file=sys.stderr)
        return 1 if stale else 0
    ensure_models(args.repo)
    for name, version in ONNX_MODELS:
        path = onnx_path(args.repo, name, version)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        print(f"{path} {path.stat().st_size} bytes sha256:{digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
