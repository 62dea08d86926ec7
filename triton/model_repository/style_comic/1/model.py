"""style_comic v1: comic-book look (smoothed, posterised colours and inked edges), vectorised over the batch.

Contract: input ``image`` UINT8 [N, H, W, 3], output ``output`` UINT8 [N, H, W, 3].

Method: a 5x5 box blur flattens texture, each channel is posterised to
``LEVELS`` flat tones, and a Sobel edge map of the luminance (thresholded per
image at a percentile, so busy and quiet images both get lines) is inked in
black on top.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

LEVELS = 5
EDGE_PERCENTILE = 88.0
MIN_EDGE = 40.0  # Sobel magnitude below which nothing is inked, even on flat images
BLUR_RADIUS = 2
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _box_blur(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window of an [N, H, W, C] array (edge-padded), via cumulative sums."""
    p = np.pad(x, ((0, 0), (r + 1, r), (r + 1, r), (0, 0)), mode="edge").astype(np.float64)
    c = p.cumsum(axis=1).cumsum(axis=2)
    k = 2 * r + 1
    s = c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]
    return (s / (k * k)).astype(np.float32)


def _sobel_magnitude(g: np.ndarray) -> np.ndarray:
    """Gradient magnitude of an [N, H, W] array with 3x3 Sobel kernels (edge-padded)."""
    p = np.pad(g, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = g.shape[1], g.shape[2]

    def at(dy: int, dx: int) -> np.ndarray:
        return p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return np.hypot(gx, gy)


def comic(batch: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, H, W, 3] uint8 comic-styled."""
    x = _box_blur(batch.astype(np.float32), BLUR_RADIUS)
    step = 255.0 / (LEVELS - 1)
    poster = np.rint(x / step) * step
    edges = _sobel_magnitude(x @ LUMA)
    cut = np.maximum(np.percentile(edges, EDGE_PERCENTILE, axis=(1, 2), keepdims=True), MIN_EDGE)
    ink = (edges > cut)[..., None]
    return np.where(ink, 0.0, np.clip(poster, 0.0, 255.0)).astype(np.uint8)


def check_config(config: dict[str, Any]) -> None:
    """Fails the load (not the first request) when config.pbtxt and this code disagree."""
    inputs = {i["name"]: i for i in config["input"]}
    outputs = {o["name"]: o for o in config["output"]}
    if set(inputs) != {"image"} or set(outputs) != {"output"}:
        raise ValueError(f"style_comic expects input 'image' and output 'output', config: {inputs}, {outputs}")
    for t in (inputs["image"], outputs["output"]):
        if t["data_type"] != "TYPE_UINT8" or [int(d) for d in t["dims"]] != [-1, -1, 3]:
            raise ValueError(f"style_comic expects UINT8 [-1, -1, 3] tensors, config has {t}")
    if int(config.get("max_batch_size", 0)) < 1:
        raise ValueError("style_comic is written for batching: max_batch_size must be >= 1")


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
            outs = np.split(comic(np.concatenate(arrays)), np.cumsum([len(a) for a in arrays])[:-1])
            for (i, _), out in zip(members, outs, strict=True):
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("output", out)])
        return responses
