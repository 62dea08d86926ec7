"""background_remove v1: RGBA cut-out with a soft alpha mask, vectorised over the batch.

Contract: input ``image`` UINT8 [N, H, W, 3], output ``output`` UINT8
[N, H, W, 4]: the input's RGB and an alpha channel (0 = background,
255 = foreground).

Method (classical, deterministic): the background is modelled by the colours
along the image border, one robust (median) colour per side, so plain and
two-tone or gradient backdrops (product shots, scans, studio photos) are
handled. A pixel's foreground evidence is its distance in RGB space to the
nearest of those colours, measured against the border's own spread (noise,
JPEG artefacts). The evidence is smoothed with a box filter (a cheap stand-in
for guided filtering) and mapped to [0, 1] with a smoothstep, so edges get
partial alpha instead of jaggies. No segmentation network ships inside a
PyPI package without a separate weight download, hence the classical method.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

BORDER_FRACTION = 0.04  # border strip width as a fraction of the short side
MIN_THRESHOLD = 24.0  # RGB distance below which a pixel is background, even on a clean border
NOISE_FACTOR = 3.0  # threshold in units of the border's 90th-percentile distance
SOFT_BAND = 1.0  # width of the soft edge, in units of the threshold
SMOOTH_RADIUS_FRACTION = 0.006  # box-filter radius as a fraction of the short side


def _box_filter(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window of an [N, H, W] array (edge-padded), via cumulative sums: O(1) in r."""
    if r <= 0:
        return x
    p = np.pad(x, ((0, 0), (r + 1, r), (r + 1, r)), mode="edge").astype(np.float64)
    c = p.cumsum(axis=1).cumsum(axis=2)
    k = 2 * r + 1
    s = c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]
    return (s / (k * k)).astype(np.float32)


def alpha_mask(batch: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, H, W] uint8 alpha (255 = foreground)."""
    x = batch.astype(np.float32)
    _n, h, w, _c = x.shape
    b = max(1, round(min(h, w) * BORDER_FRACTION))
    sides = [x[:, :b, :, :], x[:, -b:, :, :], x[:, :, :b, :], x[:, :, -b:, :]]
    # One background colour per side: [N, 4, 3].
    bg = np.stack([np.median(s.reshape(len(x), -1, 3), axis=1) for s in sides], axis=1)
    # Distance of every pixel to its nearest background colour: [N, H, W].
    # (A loop over the four colours, not over images: it keeps peak memory at one [N, H, W, 3].)
    dist = np.min([np.linalg.norm(x - bg[:, None, None, k, :], axis=-1) for k in range(bg.shape[1])], axis=0)
    # Spread of the border itself, so noisy borders need more evidence.
    border = np.concatenate(
        [dist[:, :b, :].reshape(len(x), -1), dist[:, -b:, :].reshape(len(x), -1),
         dist[:, :, :b].reshape(len(x), -1), dist[:, :, -b:].reshape(len(x), -1)],
        axis=1,
    )  # fmt: skip
    threshold = np.maximum(NOISE_FACTOR * np.percentile(border, 90, axis=1), MIN_THRESHOLD)[:, None, None]
    evidence = _box_filter(dist, max(1, round(min(h, w) * SMOOTH_RADIUS_FRACTION)))
    t = np.clip((evidence - threshold) / (SOFT_BAND * threshold) + 0.5, 0.0, 1.0)
    alpha = t * t * (3.0 - 2.0 * t)  # smoothstep: soft but decisive edges
    return np.rint(alpha * 255.0).astype(np.uint8)


def remove_background(batch: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, H, W, 4] uint8 RGBA."""
    return np.concatenate([batch, alpha_mask(batch)[..., None]], axis=-1)


def check_config(config: dict[str, Any]) -> None:
    """Fails the load (not the first request) when config.pbtxt and this code disagree."""
    inputs = {i["name"]: i for i in config["input"]}
    outputs = {o["name"]: o for o in config["output"]}
    if set(inputs) != {"image"} or set(outputs) != {"output"}:
        raise ValueError(f"background_remove expects input 'image', output 'output'; config: {inputs}, {outputs}")
    for t, channels in ((inputs["image"], 3), (outputs["output"], 4)):
        if t["data_type"] != "TYPE_UINT8" or [int(d) for d in t["dims"]] != [-1, -1, channels]:
            raise ValueError(f"background_remove expects UINT8 [-1, -1, {channels}] for {t['name']}, config: {t}")
    if int(config.get("max_batch_size", 0)) < 1:
        raise ValueError("background_remove is written for batching: max_batch_size must be >= 1")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        check_config(json.loads(args["model_config"]))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        # Triton's batcher only batches equal shapes, but a batch may still mix shapes
        # (requests carrying their own batch); group so each shape is one vectorised pass.
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for i, request in enumerate(requests):
            array = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            groups.setdefault(array.shape[1:], []).append((i, array))
        for members in groups.values():
            arrays = [a for _, a in members]
            outs = np.split(remove_background(np.concatenate(arrays)), np.cumsum([len(a) for a in arrays])[:-1])
            for (i, _), out in zip(members, outs, strict=True):
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("output", out)])
        return responses
