"""ONNX Runtime on the CPU inside the Python backend, for an ONNX model served by the cpu profile.

Why a wrapper: the Triton shipped in the ``nvidia-pytriton`` wheel (what the
local stack runs) has the Python backend but no onnxruntime backend. The gpu
profile serves the same ``model.onnx`` with ``platform: "onnxruntime_onnx"``
and no ``model.py``. This file is identical in every ONNX model's version
folder; the tensor names and shapes come from config.pbtxt and are checked
against the ONNX graph at load, so a mismatch fails the load, not a request.

Contract: one FP32 input and one FP32 output, batched on the first dimension
(see config.pbtxt). Same-shape requests are concatenated and run once.
Parameter ``intra_op_threads`` (config.pbtxt) bounds ONNX Runtime's threads,
so several models share a small machine without oversubscription.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _dims_match(config_dims: list[int], onnx_dims: list[Any]) -> bool:
    """True when the ONNX graph's non-batch dims agree with config.pbtxt (symbolic dims match anything)."""
    if len(config_dims) != len(onnx_dims):
        return False
    return all(not isinstance(o, int) or c in (-1, o) for c, o in zip(config_dims, onnx_dims, strict=True))


def open_session(path: Path, config: dict[str, Any]) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for ``path``, checked against the model config."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make models` (triton/scripts/export_models.py)")
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    for kind, tensors, declared in (
        ("input", session.get_inputs(), config["input"]),
        ("output", session.get_outputs(), config["output"]),
    ):
        graph = {t.name: t for t in tensors}
        if len(declared) != 1 or len(graph) != 1 or declared[0]["name"] not in graph:
            raise ValueError(f"{kind}s differ: config.pbtxt {[d['name'] for d in declared]}, ONNX {list(graph)}")
        t, d = graph[declared[0]["name"]], declared[0]
        if t.type != "tensor(float)" or d["data_type"] != "TYPE_FP32":
            raise ValueError(f"{kind} {t.name}: expected FP32, config {d['data_type']}, ONNX {t.type}")
        if not _dims_match([int(x) for x in d["dims"]], list(t.shape)[1:]):
            raise ValueError(f"{kind} {t.name}: config dims {d['dims']} differ from ONNX shape {t.shape}")
    return session


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = open_session(path, config)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        batch = np.ascontiguousarray(np.concatenate(arrays), dtype=np.float32)
        (result,) = self.session.run([self.output_name], {self.input_name: batch})
        outs = np.split(result, np.cumsum([len(a) for a in arrays])[:-1])
        return [pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, o)]) for o in outs]
