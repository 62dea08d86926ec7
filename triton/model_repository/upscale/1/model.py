"""upscale v1: bicubic upscaling by 2 or 4, vectorised over the batch.

Contract: input ``image`` UINT8 [N, H, W, 3], output ``output`` UINT8
[N, s*H, s*W, 3], where the scale ``s`` comes from the request parameter
``scale`` (2 or 4, default 2; any other value fails that request alone with
INVALID_ARG). Requests of one shape and one scale are concatenated and
resampled in one pass.

Method: separable Keys bicubic interpolation (a = -0.5, the kernel of
OpenCV's and Pillow's bicubic), pixel-centre aligned, edge-clamped. No
learned super-resolution model ships inside a PyPI package (OpenCV's
``dnn_superres`` needs weight files that are downloaded separately), so this
is the classical method; a learned model replaces ``upscale`` below.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

SCALES = (2, 4)
DEFAULT_SCALE = 2
KEYS_A = -0.5


def _cubic(t: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel evaluated at distances ``t``."""
    t = np.abs(t)
    a = KEYS_A
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


def _taps(size: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [4, size*scale] and weights [4, size*scale] for one axis."""
    out = np.arange(size * scale, dtype=np.float64)
    src = (out + 0.5) / scale - 0.5
    base = np.floor(src).astype(np.int64)
    frac = src - base
    offsets = np.arange(-1, 3)[:, None]
    idx = np.clip(base[None, :] + offsets, 0, size - 1)
    weights = _cubic(frac[None, :] - offsets)
    weights /= weights.sum(axis=0, keepdims=True)
    return idx, weights.astype(np.float32)


def upscale(batch: np.ndarray, scale: int) -> np.ndarray:
    """[N, H, W, C] uint8 -> [N, scale*H, scale*W, C] uint8, bicubic."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale}")
    x = batch.astype(np.float32)
    idx, w = _taps(x.shape[1], scale)
    # Rows first: gather the four source rows of every output row and blend them.
    x = sum(x[:, idx[k], :, :] * w[k][None, :, None, None] for k in range(4))
    idx, w = _taps(x.shape[2], scale)
    x = sum(x[:, :, idx[k], :] * w[k][None, None, :, None] for k in range(4))
    return np.clip(np.rint(x), 0.0, 255.0).astype(np.uint8)


def parse_scale(parameters: str | dict[str, Any] | None) -> int:
    """The ``scale`` request parameter (JSON string as the Python backend gives it), validated."""
    params = json.loads(parameters) if isinstance(parameters, str) else (parameters or {})
    value = params.get("scale", DEFAULT_SCALE)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value not in SCALES:
        raise ValueError(f"request parameter 'scale' must be one of {list(SCALES)}, got {value!r}")
    return value


def check_config(config: dict[str, Any]) -> None:
    """Fails the load (not the first request) when config.pbtxt and this code disagree."""
    inputs = {i["name"]: i for i in config["input"]}
    outputs = {o["name"]: o for o in config["output"]}
    if set(inputs) != {"image"} or set(outputs) != {"output"}:
        raise ValueError(f"upscale expects input 'image' and output 'output', config has {inputs}, {outputs}")
    for t in (inputs["image"], outputs["output"]):
        if t["data_type"] != "TYPE_UINT8" or [int(d) for d in t["dims"]] != [-1, -1, 3]:
            raise ValueError(f"upscale expects UINT8 [-1, -1, 3] tensors, config has {t}")
    if int(config.get("max_batch_size", 0)) < 1:
        raise ValueError("upscale is written for batching: max_batch_size must be >= 1")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        check_config(json.loads(args["model_config"]))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        # Group by (scale, image shape): one vectorised pass per group.
        groups: dict[tuple[int, tuple[int, ...]], list[tuple[int, np.ndarray]]] = {}
        for i, request in enumerate(requests):
            try:
                scale = parse_scale(request.parameters())
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                )
                continue
            array = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            groups.setdefault((scale, array.shape[1:]), []).append((i, array))
        for (scale, _shape), members in groups.items():
            arrays = [a for _, a in members]
            outs = np.split(upscale(np.concatenate(arrays), scale), np.cumsum([len(a) for a in arrays])[:-1])
            for (i, _), out in zip(members, outs, strict=True):
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("output", out)])
        return responses
