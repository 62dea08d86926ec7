"""sim_gpu: a simulated GPU whose execution time follows a T4-like profile, for the benchmark.

Contract: input ``image`` UINT8 [N, H, W, 3], output ``output`` UINT8 [N, H, W, 3]
equal to the input (identity). One execution of a batch of N images takes
``fixed_ms + per_image_ms * N`` milliseconds, *slept* (not spun), so it costs
no CPU, as a GPU kernel would not, and the fixed cost dominates as it does on
a GPU: batching pays here as it would on a T4. ``fixed_ms`` and
``per_image_ms`` are parameters of ``config.pbtxt``, checked at load.
"""

from __future__ import annotations

import json
import time
from typing import Any

import triton_python_backend_utils as pb_utils

PROFILE_KEYS = ("fixed_ms", "per_image_ms")


def profile_of(config: dict[str, Any]) -> tuple[float, float]:
    """``(fixed_ms, per_image_ms)`` from the model config; fails the load when the config is off-contract."""
    inputs = {i["name"]: i for i in config["input"]}
    outputs = {o["name"]: o for o in config["output"]}
    if set(inputs) != {"image"} or set(outputs) != {"output"}:
        raise ValueError(f"sim_gpu expects input 'image' and output 'output', config has {inputs}, {outputs}")
    for tensor in (inputs["image"], outputs["output"]):
        if tensor["data_type"] != "TYPE_UINT8" or [int(d) for d in tensor["dims"]] != [-1, -1, 3]:
            raise ValueError(f"sim_gpu expects UINT8 [-1, -1, 3] tensors, config has {tensor}")
    if int(config.get("max_batch_size", 0)) < 1:
        raise ValueError("sim_gpu simulates batching: max_batch_size must be >= 1")
    params = config.get("parameters", {})
    values = []
    for key in PROFILE_KEYS:
        value = float(params[key]["string_value"])
        if value < 0:
            raise ValueError(f"sim_gpu {key} must be >= 0, not {value}")
        values.append(value)
    return values[0], values[1]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.fixed_s, self.per_image_s = (v / 1000.0 for v in profile_of(json.loads(args["model_config"])))

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy() for r in requests]
        time.sleep(self.fixed_s + self.per_image_s * sum(len(a) for a in arrays))
        return [pb_utils.InferenceResponse([pb_utils.Tensor("output", a)]) for a in arrays]
