"""style_aged v1: old-photograph look (sepia, faded contrast, vignette, film grain), vectorised over the batch.

Contract: input ``image`` UINT8 [N, H, W, 3], output ``output`` UINT8 [N, H, W, 3].

Method: the classic sepia colour matrix, a contrast fade towards warm grey,
a radial vignette and monochrome film grain. The grain comes from a generator
seeded with a constant and the image size only, so an image gets the same
output whichever batch Triton puts it in: the model is deterministic.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

SEPIA = np.array(
    [[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32
).T  # applied as x @ SEPIA to [..., 3] RGB
FADE = 0.18  # blend weight towards the paper tone
PAPER = np.array([222.0, 205.0, 170.0], np.float32)
VIGNETTE_STRENGTH = 0.55
GRAIN_SIGMA = 9.0
GRAIN_SEED = 1889  # fixed: grain is part of the look, not noise in the output


def _vignette(h: int, w: int) -> np.ndarray:
    """[H, W, 1] multiplicative falloff: 1 in the centre, 1 - strength in the corners."""
    yy = (np.arange(h, dtype=np.float32) - (h - 1) / 2) / max(h / 2, 1.0)
    xx = (np.arange(w, dtype=np.float32) - (w - 1) / 2) / max(w / 2, 1.0)
    r2 = (yy[:, None] ** 2 + xx[None, :] ** 2) / 2.0  # 0 centre, 1 corners
    return (1.0 - VIGNETTE_STRENGTH * r2**1.5)[..., None]


def _grain(h: int, w: int) -> np.ndarray:
    """[H, W, 1] zero-mean grain, a function of (seed, H, W) only."""
    rng = np.random.default_rng([GRAIN_SEED, h, w])
    return (rng.standard_normal((h, w), dtype=np.float32) * GRAIN_SIGMA)[..., None]


def age(batch: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, H, W, 3] uint8 aged."""
    _n, h, w, _c = batch.shape
    x = batch.astype(np.float32) @ SEPIA
    x = (1.0 - FADE) * x + FADE * PAPER
    x = x * _vignette(h, w) + _grain(h, w)  # broadcast over the batch: the same film for every image
    return np.clip(np.rint(x), 0.0, 255.0).astype(np.uint8)


def check_config(config: dict[str, Any]) -> None:
    """Fails the load (not the first request) when config.pbtxt and this code disagree."""
    inputs = {i["name"]: i for i in config["input"]}
    outputs = {o["name"]: o for o in config["output"]}
    if set(inputs) != {"image"} or set(outputs) != {"output"}:
        raise ValueError(f"style_aged expects input 'image' and output 'output', config: {inputs}, {outputs}")
    for t in (inputs["image"], outputs["output"]):
        if t["data_type"] != "TYPE_UINT8" or [int(d) for d in t["dims"]] != [-1, -1, 3]:
            raise ValueError(f"style_aged expects UINT8 [-1, -1, 3] tensors, config has {t}")
    if int(config.get("max_batch_size", 0)) < 1:
        raise ValueError("style_aged is written for batching: max_batch_size must be >= 1")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        check_config(json.loads(args["model_config"]))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        # One vectorised pass per distinct image shape in the batch.
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for i, request in enumerate(requests):
            array = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            groups.setdefault(array.shape[1:], []).append((i, array))
        for members in groups.values():
            arrays = [a for _, a in members]
            outs = np.split(age(np.concatenate(arrays)), np.cumsum([len(a) for a in arrays])[:-1])
            for (i, _), out in zip(members, outs, strict=True):
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("output", out)])
        return responses
