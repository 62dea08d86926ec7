"""image_decode v1: server-side decode of encoded images, the first step of the ``enhance_bytes`` ensemble.

Contract: input ``image_bytes`` BYTES [N, 1] (one encoded JPEG, PNG, WebP,
BMP or TIFF image per row), output ``image`` UINT8 [N, H, W, 3] RGB with the
EXIF orientation applied. A request whose rows decode to different sizes, or
whose bytes are not an image, or whose header declares more than
``max_pixels`` (config.pbtxt parameter) pixels fails alone with INVALID_ARG;
the pixel limit is checked on the header, before any pixel is allocated, so a
decompression bomb costs nothing.

Decoding is inherently one image at a time (each has its own size and
codec), so this model loops over images; the transforms downstream are the
vectorised part.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import cv2
import numpy as np
import triton_python_backend_utils as pb_utils

DEFAULT_MAX_PIXELS = 40_000_000
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding; None for other formats or odd files."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker in _JPEG_SOF:
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return w, h
            i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return None


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> [H, W, 3] uint8 RGB, or ValueError with a reason a client can act on."""
    size = header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ValueError(f"image is {size[0]}x{size[1]}, more than the limit of {max_pixels} pixels")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # applies EXIF orientation
    if bgr is None:
        raise ValueError(f"bytes are not a decodable image ({len(data)} bytes, starting {data[:8]!r})")
    if bgr.shape[0] * bgr.shape[1] > max_pixels:
        raise ValueError(f"image is {bgr.shape[1]}x{bgr.shape[0]}, more than the limit of {max_pixels} pixels")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def decode_rows(rows: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """[N, 1] object array of bytes -> [N, H, W, 3]; all rows of one request must share a size."""
    images = [decode(bytes(row[0]), max_pixels) for row in rows]
    if len({im.shape for im in images}) > 1:
        raise ValueError(f"a request's images must share one size, got {sorted({im.shape for im in images})}")
    return np.stack(images)


def check_config(config: dict[str, Any]) -> None:
    """Fails the load (not the first request) when config.pbtxt and this code disagree."""
    (i,), (o,) = config["input"], config["output"]
    if (i["name"], i["data_type"], [int(d) for d in i["dims"]]) != ("image_bytes", "TYPE_STRING", [1]):
        raise ValueError(f"image_decode expects input image_bytes BYTES [1], config has {i}")
    if (o["name"], o["data_type"], [int(d) for d in o["dims"]]) != ("image", "TYPE_UINT8", [-1, -1, 3]):
        raise ValueError(f"image_decode expects output image UINT8 [-1, -1, 3], config has {o}")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        check_config(config)
        params = config.get("parameters", {})
        self.max_pixels = int(params.get("max_pixels", {}).get("string_value", DEFAULT_MAX_PIXELS))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "image_bytes").as_numpy()
            try:
                image = decode_rows(rows, self.max_pixels)
            except ValueError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("image", image)]))
        return responses
