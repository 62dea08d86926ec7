"""image_encode v1: server-side encode, the last step of the ``enhance_bytes`` ensemble.

Contract: input ``image`` UINT8 [N, H, W, 3] RGB, output ``output_bytes``
BYTES [N, 1], one encoded image per row. The format is the config.pbtxt
parameter ``format`` (``png``, lossless, the default; or ``jpeg`` with
``jpeg_quality``). Encoding is per image by nature (each row is its own
file), so this model loops over images.
"""

from __future__ import annotations

import json
from typing import Any

import cv2
import numpy as np
import triton_python_backend_utils as pb_utils

FORMATS = {"png": ".png", "jpeg": ".jpg"}
PNG_COMPRESSION = 3  # zlib level: near the size of 9 at a fraction of the CPU


def encode(image: np.ndarray, fmt: str = "png", jpeg_quality: int = 92) -> bytes:
    """[H, W, 3] uint8 RGB -> encoded bytes."""
    flags = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION] if fmt == "png" else [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    ok, buf = cv2.imencode(FORMATS[fmt], np.ascontiguousarray(image[:, :, ::-1]), flags)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} image as {fmt}")
    return buf.tobytes()


def encode_batch(batch: np.ndarray, fmt: str = "png", jpeg_quality: int = 92) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, 1] object array of encoded bytes."""
    return np.array([[encode(im, fmt, jpeg_quality)] for im in batch], dtype=np.object_)


def check_config(config: dict[str, Any]) -> tuple[str, int]:
    """Validates config.pbtxt at load and returns (format, jpeg quality)."""
    (i,), (o,) = config["input"], config["output"]
    if (i["name"], i["data_type"], [int(d) for d in i["dims"]]) != ("image", "TYPE_UINT8", [-1, -1, 3]):
        raise ValueError(f"image_encode expects input image UINT8 [-1, -1, 3], config has {i}")
    if (o["name"], o["data_type"], [int(d) for d in o["dims"]]) != ("output_bytes", "TYPE_STRING", [1]):
        raise ValueError(f"image_encode expects output output_bytes BYTES [1], config has {o}")
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    fmt = params.get("format", "png")
    if fmt not in FORMATS:
        raise ValueError(f"image_encode parameter format must be one of {sorted(FORMATS)}, got {fmt!r}")
    quality = int(params.get("jpeg_quality", "92"))
    if not 1 <= quality <= 100:
        raise ValueError(f"image_encode parameter jpeg_quality must be in [1, 100], got {quality}")
    return fmt, quality


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.format, self.jpeg_quality = check_config(json.loads(args["model_config"]))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            batch = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            out = encode_batch(batch, self.format, self.jpeg_quality)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("output_bytes", out)]))
        return responses
