"""pcb_detector v1: a real object detector behind the YOLOv5 output interface.

Contract (seed 003): input ``images`` FP32 [N, 3, 640, 640], RGB, CHW, values
in [0, 1]; output ``output`` FP32 [N, 25200, 85], one row per candidate box in
YOLOv5 layout: ``cx, cy, w, h`` in input pixels, ``objectness``, then 80
class probabilities (COCO order). Rows past the detections are all zero, so a
YOLO decoder (confidence = objectness * class probability, then NMS), which
the worker runs, keeps only real boxes.

Detector: OpenCV's Haar cascades that ship inside ``opencv-python-headless``
(``cv2.data.haarcascades``; no download), one per class in ``CASCADES``. They
stand in for the user's trained PCB-defect YOLO weights: the tensor contract
is the one that model has, so swapping in ``model.onnx`` with
``platform: "onnxruntime_onnx"`` changes no worker code. Objectness is the
logistic of the cascade's final-stage weight, a monotone confidence.

Cascades run one image at a time (OpenCV's API is per image); the colour
conversion before them is vectorised over the batch.
"""

from __future__ import annotations

import json
from typing import Any

import cv2
import numpy as np
import triton_python_backend_utils as pb_utils

SIZE = 640
ROWS = 25200  # YOLOv5 at 640: 3 anchors x (80^2 + 40^2 + 20^2)
CLASSES = 80
# COCO class index -> cascade file shipped in cv2.data.haarcascades.
CASCADES: dict[int, str] = {
    0: "haarcascade_frontalface_default.xml",  # person (faces)
    15: "haarcascade_frontalcatface.xml",  # cat (cat faces)
}
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 4
MIN_SIZE = 24
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class Detector:
    """The cascades, loaded once, and the per-image detection into YOLO rows."""

    def __init__(self) -> None:
        self.cascades: dict[int, cv2.CascadeClassifier] = {}
        for cls, filename in CASCADES.items():
            cascade = cv2.CascadeClassifier(cv2.data.haarcascades + filename)
            if cascade.empty():
                raise RuntimeError(f"cannot load {filename} from {cv2.data.haarcascades}")
            self.cascades[cls] = cascade

    def rows(self, grey: np.ndarray) -> np.ndarray:
        """[640, 640] uint8 luminance -> [k, 85] YOLO rows for the k detections."""
        out = []
        for cls, cascade in self.cascades.items():
            boxes, _levels, weights = cascade.detectMultiScale3(
                grey,
                scaleFactor=SCALE_FACTOR,
                minNeighbors=MIN_NEIGHBORS,
                minSize=(MIN_SIZE, MIN_SIZE),
                outputRejectLevels=True,
            )
            for (x, y, w, h), weight in zip(np.asarray(boxes).reshape(-1, 4), np.ravel(weights), strict=True):
                row = np.zeros(5 + CLASSES, np.float32)
                row[:4] = (x + w / 2.0, y + h / 2.0, w, h)
                row[4] = 1.0 / (1.0 + np.exp(-float(weight)))
                row[5 + cls] = 1.0
                out.append(row)
        return np.array(out, np.float32).reshape(-1, 5 + CLASSES)[:ROWS]

    def detect(self, images: np.ndarray) -> np.ndarray:
        """[N, 3, 640, 640] float in [0, 1] -> [N, 25200, 85] YOLO-layout rows."""
        grey = np.clip(np.einsum("nchw,c->nhw", images, LUMA) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        result = np.zeros((len(images), ROWS, 5 + CLASSES), np.float32)
        for i in range(len(images)):
            rows = self.rows(grey[i])
            result[i, : len(rows)] = rows
        return result


def check_config(config: dict[str, Any]) -> None:
    """Fails the load (not the first request) when config.pbtxt and this code disagree."""
    inputs = {i["name"]: i for i in config["input"]}
    outputs = {o["name"]: o for o in config["output"]}
    if set(inputs) != {"images"} or set(outputs) != {"output"}:
        raise ValueError(f"pcb_detector expects input 'images', output 'output'; config: {inputs}, {outputs}")
    expected = ((inputs["images"], [3, SIZE, SIZE]), (outputs["output"], [ROWS, 5 + CLASSES]))
    for t, dims in expected:
        if t["data_type"] != "TYPE_FP32" or [int(d) for d in t["dims"]] != dims:
            raise ValueError(f"pcb_detector expects FP32 {dims} for {t['name']}, config has {t}")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        check_config(json.loads(args["model_config"]))
        self.detector = Detector()

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
        outs = np.split(self.detector.detect(np.concatenate(arrays)), np.cumsum([len(a) for a in arrays])[:-1])
        return [pb_utils.InferenceResponse([pb_utils.Tensor("output", o)]) for o in outs]
