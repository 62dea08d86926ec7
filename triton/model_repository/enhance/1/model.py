"""enhance v1: auto-contrast and mild unsharp mask, vectorised over the batch.

Contract: input ``image`` UINT8 [N, H, W, 3] (one shape per batch, which
Triton guarantees for batched requests), output ``output`` UINT8 [N, H, W, 3].
Per image, each channel is stretched from its 1st/99th percentile to [0, 255],
then sharpened with a 3x3 unsharp mask (amount 0.6).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

SHARPEN_AMOUNT = 0.6
LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.0


def _box_blur(x: np.ndarray) -> np.ndarray:
    """3x3 box blur over axes 1 and 2 of an [N, H, W, C] float array, edge-padded."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1], x.shape[2]
    acc = np.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            acc += p[:, dy : dy + h, dx : dx + w, :]
    return acc / 9.0


def enhance(batch: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, H, W, 3] uint8 enhanced (see the module docstring)."""
    x = batch.astype(np.float32)
    lo = np.percentile(x, LOW_PERCENTILE, axis=(1, 2), keepdims=True)
    hi = np.percentile(x, HIGH_PERCENTILE, axis=(1, 2), keepdims=True)
    x = (x - lo) * (255.0 / np.maximum(hi - lo, 1.0))
    x = x + SHARPEN_AMOUNT * (x - _box_blur(x))
    return np.clip(x, 0.0, 255.0).astype(np.uint8)


def check_config(config: dict[str, Any]) -> None:
    """Fails the load (not the first request) when config.pbtxt and this code disagree."""
    inputs = {i["name"]: i for i in config["input"]}
    outputs = {o["name"]: o for o in config["output"]}
    if set(inputs) != {"image"} or set(outputs) != {"output"}:
        raise ValueError(f"enhance expects input 'image' and output 'output', config has {inputs}, {outputs}")
    for t in (inputs["image"], outputs["output"]):
        if t["data_type"] != "TYPE_UINT8" or [int(d) for d in t["dims"]] != [-1, -1, 3]:
            raise ValueError(f"enhance expects UINT8 [-1, -1, 3] tensors, config has {t}")
    if int(config.get("max_batch_size", 0)) < 1:
        raise ValueError("enhance is written for batching: max_batch_size must be >= 1")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        check_config(json.loads(args["model_config"]))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        # Triton batches requests of one shape; each request may itself carry a batch.
        # Group by shape so every group is one vectorised pass.
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for i, request in enumerate(requests):
            array = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            groups.setdefault(array.shape[1:], []).append((i, array))
        for members in groups.values():
            arrays = [a for _, a in members]
            outs = np.split(enhance(np.concatenate(arrays)), np.cumsum([len(a) for a in arrays])[:-1])
            for (i, _), out in zip(members, outs, strict=True):
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("output", out)])
        return responses
