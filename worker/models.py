"""The models' contracts: what each model takes, what it returns, and how a job is turned into its tensor and back.

A model is described by its *kind*; the kind owns the pure pre- and
post-processing, so adding a model of a known kind is a configuration entry,
not new code. A model states its kind in its Triton ``config.pbtxt``
(``parameters { key: "tritonq_kind" value { string_value: "image" } }``); the
built-in table below covers the seed models whose configs predate that. Tensor
names, data types and ``max_batch_size`` come from Triton's own model config,
read at start (``ModelSpec.from_triton_config``), so the worker never
disagrees with what Triton serves.

Kinds:
- ``image``: UINT8 ``[H, W, 3]`` in, UINT8 ``[H', W', 3|4]`` out, encoded as JPEG (opaque) or PNG (alpha).
- ``embedding``: FP32 ``[3, S, S]`` in, FP32 ``[D]`` out, L2-normalised, written as JSON or ``.npy``.
- ``classification``: FP32 ``[3, S, S]`` in, FP32 logits ``[C]`` out, top-k labels as JSON.
- ``detections``: FP32 ``[3, S, S]`` in, YOLO rows ``[R, 5 + C]`` out, NMS-filtered boxes as JSON.
- ``encoded_image``: the encoded file in, an encoded image out (BYTES both ways): decoding and encoding
  run inside Triton (an ensemble), for producers who want preprocessing on the server.

A job's params are declared per model (``tritonq_params`` in its config, e.g.
``"scale=2|4;strength=0..100"``, or the built-in table): a name the model does
not declare, or a value outside its choices or range, is an ``invalid_param``,
and only declared params reach Triton as request parameters.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker import images
from worker.errors import PermanentJobError

#: Kinds of the seed models whose Triton configs carry no ``tritonq_kind``.
BUILTIN_KINDS = {
    "upscale": "image",
    "enhance": "image",
    "background_remove": "image",
    "style_comic": "image",
    "style_aged": "image",
    "embedding": "embedding",
    "openclip_vit_b32": "embedding",
    "resnet50": "classification",
    "pcb_detector": "detections",
}
KINDS = frozenset({"image", "embedding", "classification", "detections", "encoded_image"})
#: ``tritonq_params`` of the seed models whose Triton configs carry none.
BUILTIN_PARAMS = {"upscale": "scale=2|4"}
#: Pixels per side: image inputs are padded up to one of these, so images of many sizes share Triton batches.
SHAPE_BUCKETS_PX = (32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
#: Params the worker itself reads, accepted by every model and never sent to Triton
#: (``preprocess=server`` sends a job to the model's ``_bytes`` variant).
WORKER_PARAMS = {"preprocess": ("worker", "server")}
#: Integer params are at most this many digits: ranges are for small numbers, not arithmetic on huge ones.
_INTEGER_RE = re.compile(r"-?[0-9]{1,9}")
#: Triton data type names to numpy.
WIRE_DTYPES = {
    "TYPE_UINT8": "UINT8",
    "TYPE_FP32": "FP32",
    "TYPE_INT32": "INT32",
    "TYPE_FP16": "FP16",
    "TYPE_STRING": "BYTES",
}
#: Triton wire data types to numpy.
NUMPY_DTYPES = {"UINT8": np.uint8, "FP32": np.float32, "INT32": np.int32, "FP16": np.float16, "INT64": np.int64}
#: Per-channel mean and standard deviation of the ``tritonq_normalize: imagenet`` config parameter.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
#: Encoded outputs are named by their magic bytes.
MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpeg"), (b"RIFF", "webp"))
TOP_K = 5
SCORE_THRESHOLD = 0.25
IOU_THRESHOLD = 0.45


@dataclass(frozen=True)
class Tensor:
    """A named tensor of a model's contract (shape without the batch dimension)."""

    name: str
    dtype: str
    dims: tuple[int, ...]

    @property
    def wire_dtype(self) -> str:
        return WIRE_DTYPES[self.dtype]


@dataclass(frozen=True)
class Param:
    """One request parameter a model declares: a set of ``choices`` (the first is the default), or an integer range."""

    name: str
    choices: tuple[str, ...] = ()
    low: int = 0
    high: int = 0

    def check(self, value: str) -> str:
        if self.choices:
            if value not in self.choices:
                raise PermanentJobError("invalid_param", f"param {self.name!r} must be one of {list(self.choices)}")
            return value
        if not _INTEGER_RE.fullmatch(value) or not self.low <= int(value) <= self.high:
            raise PermanentJobError(
                "invalid_param", f"param {self.name!r} must be an integer in [{self.low}, {self.high}]"
            )
        return value


def parse_params(text: str) -> dict[str, Param]:
    """Parse ``name=a|b|c;name2=low..high`` (a model's ``tritonq_params``); ``ValueError`` names the bad entry."""
    declared: dict[str, Param] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, rule = (piece.strip() for piece in entry.partition("="))
        if not sep or not name or not rule:
            raise ValueError(f"tritonq_params entry {entry!r}: expected name=a|b or name=low..high")
        low, dots, high = rule.partition("..")
        if dots:
            if not (_INTEGER_RE.fullmatch(low) and _INTEGER_RE.fullmatch(high)) or int(low) > int(high):
                raise ValueError(f"tritonq_params entry {entry!r}: {rule!r} is not an integer range")
            declared[name] = Param(name, low=int(low), high=int(high))
        else:
            declared[name] = Param(name, choices=tuple(c.strip() for c in rule.split("|") if c.strip()))
    return declared


@dataclass(frozen=True)
class Prepared:
    """A job's input tensor, and what postprocessing needs to know about the original."""

    array: NDArray[Any]
    original_size: tuple[int, int]  # (width, height)
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Output:
    """An encoded result, ready to write."""

    data: bytes
    extension: str
    content_type: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """One model as the worker sees it."""

    name: str
    kind: str
    input: Tensor
    output: Tensor
    max_batch_size: int
    params: Mapping[str, str] = field(default_factory=dict)
    #: Request parameters a job may set, by name.
    declared: Mapping[str, Param] = field(default_factory=dict)

    @classmethod
    def from_triton_config(cls, config: Mapping[str, Any]) -> ModelSpec:
        """Build from Triton's model config as JSON (``get_model_config(..., as_json=True)['config']``)."""
        name = config["name"]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        kind = params.get("tritonq_kind") or BUILTIN_KINDS.get(name, "")
        if kind not in KINDS:
            raise ValueError(f"model {name!r}: unknown kind {kind!r}; set parameters.tritonq_kind in its config")

        def tensor(t: Mapping[str, Any]) -> Tensor:
            return Tensor(t["name"], t["data_type"], tuple(int(d) for d in t.get("dims", [])))

        if not config.get("input") or not config.get("output"):
            raise ValueError(f"model {name!r} declares no input or output")
        return cls(
            name=name,
            kind=kind,
            input=tensor(config["input"][0]),
            output=tensor(config["output"][0]),
            max_batch_size=int(config.get("max_batch_size", 0)),
            params=params,
            declared=parse_params(params.get("tritonq_params", BUILTIN_PARAMS.get(name, ""))),
        )

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    @property
    def square_size(self) -> tuple[int, int]:
        """(W, H) of fixed-size vision inputs laid out ``[3, H, W]``."""
        _, height, width = self.input.dims
        return (width, height)

    def request_parameters(self, params: Mapping[str, str]) -> dict[str, str]:
        """The job's params checked against the model's declaration: what reaches Triton, defaults filled in."""
        for name, value in params.items():
            if name in WORKER_PARAMS:
                if value not in WORKER_PARAMS[name]:
                    raise PermanentJobError(
                        "invalid_param", f"param {name!r} must be one of {list(WORKER_PARAMS[name])}"
                    )
            elif name not in self.declared:
                known = sorted([*self.declared, *WORKER_PARAMS])
                raise PermanentJobError(
                    "invalid_param", f"model {self.name!r} takes no param {name!r} (it takes {known})"
                )
        checked = {name: rule.check(params[name]) for name, rule in self.declared.items() if name in params}
        for name, rule in self.declared.items():
            if name not in checked and rule.choices:
                checked[name] = rule.choices[0]
        return checked

    def output_nbytes(self, prepared: Prepared) -> int:
        """Bytes of this job's output tensor (batch of one) if knowable before inference, else 0.

        Image models keep the input's extent times the ``scale`` request parameter (1 if absent).
        """
        itemsize = np.dtype(NUMPY_DTYPES[self.output.wire_dtype]).itemsize if self.output.dtype != "TYPE_STRING" else 0
        dims = self.output.dims
        if itemsize and dims and all(d > 0 for d in dims):
            return int(np.prod(dims)) * itemsize
        if self.kind == "image" and itemsize and dims and dims[-1] > 0:
            scale = int(prepared.parameters.get("scale", "1"))
            height, width = prepared.array.shape[:2]
            return height * scale * width * scale * dims[-1] * itemsize
        return 0

    def pixels_held(self, width: int, height: int, params: Mapping[str, str]) -> int:
        """Pixels one job of a ``width`` x ``height`` input holds at its peak: the decoded input, and for
        image models the output too (``scale`` times larger on each side)."""
        if self.kind != "image":
            return width * height  # square models resize to their small input; outputs are small tensors
        scale = int(self.request_parameters(params).get("scale", "1"))
        return width * height * (1 + scale * scale)

    def default_format(self, channels: int) -> str:
        if self.kind == "image":
            return "png" if channels == 4 else "jpeg"
        return "json"

    def preprocess(
        self, data: bytes, limits: images.DecodeLimits, params: Mapping[str, str], buckets: tuple[int, ...] = ()
    ) -> Prepared:
        """Decode and lay out one job's input (pure, CPU-bound: run in a thread).

        Image models get their input padded to one of ``buckets`` (empty: no padding) unless their
        config sets ``tritonq_shape_buckets: "off"``; ``postprocess`` crops the output back.
        """
        if self.kind == "image":
            array = images.decode(data, limits)
            height, width = array.shape[:2]
            if buckets and self.params.get("tritonq_shape_buckets") != "off":
                array = images.pad_to_bucket(array, buckets)
            return Prepared(array, (width, height), self.request_parameters(params))
        if self.kind == "encoded_image":
            # Triton decodes; the worker only checks the header against the same limits.
            width, height = images.probe(data, limits)
            return Prepared(np.array([data], dtype=np.object_), (width, height))
        size = self.square_size
        # Draft mode lets libjpeg decode at 1/2, 1/4, 1/8 scale when the model wants less.
        array = images.decode(data, limits, draft_size=size)
        height, width = array.shape[:2]
        tensor = images.to_chw_float(array, size)
        if self.params.get("tritonq_normalize") == "imagenet":
            tensor = (tensor - IMAGENET_MEAN) / IMAGENET_STD
        return Prepared(tensor, (width, height), self.request_parameters(params))

    def postprocess(self, output: NDArray[Any], prepared: Prepared, fmt: str) -> Output:
        """Turn one output tensor (batch dimension removed) into the bytes written to GCS."""
        if self.kind == "image":
            width, height = prepared.original_size
            padded = (prepared.array.shape[0], prepared.array.shape[1])
            output = images.crop_output(output, (height, width), padded)
            fmt = fmt or self.default_format(output.shape[-1])
            if fmt not in images.ENCODERS:
                raise PermanentJobError("invalid_format", f"{self.name} writes images: png, jpeg or webp, not {fmt}")
            return Output(images.encode(output, fmt), images.EXTENSIONS[fmt], images.CONTENT_TYPES[fmt], output.shape)
        if self.kind == "encoded_image":
            data = bytes(output.reshape(-1)[0])
            found = next((name for magic, name in MAGIC if data.startswith(magic)), "")
            if not found or (fmt and fmt != found):
                raise PermanentJobError("invalid_format", f"{self.name} returns {found or 'unknown'}, not {fmt}")
            return Output(data, images.EXTENSIONS[found], images.CONTENT_TYPES[found], output.shape)
        fmt = fmt or "json"
        if fmt not in ("json", "npy"):
            raise PermanentJobError("invalid_format", f"{self.name} writes json or npy, not {fmt}")
        if fmt == "npy":
            return Output(to_npy(output), f"{self.kind}.npy", "application/octet-stream", output.shape)
        if self.kind == "embedding":
            document: dict[str, Any] = {
                "embedding": [float(x) for x in output.reshape(-1)],
                "dim": int(output.size),
            }
        elif self.kind == "classification":
            document = {"top_k": top_k(output.reshape(-1), TOP_K)}
        else:
            boxes = decode_detections(output, self.square_size, prepared.original_size)
            document = {"detections": boxes, "image_size": list(prepared.original_size)}
        # "{job_id}.json" is the job's record: a JSON result is named by its kind beside it.
        return Output(json.dumps(document).encode(), f"{self.kind}.json", "application/json", output.shape)


def to_npy(array: NDArray[Any]) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def top_k(logits: NDArray[Any], k: int) -> list[dict[str, float | int]]:
    """The ``k`` most likely classes with softmax probabilities."""
    shifted = logits.astype(np.float64) - float(logits.max())
    probs = np.exp(shifted) / np.exp(shifted).sum()
    order = np.argsort(-probs)[:k]
    return [{"class_id": int(i), "score": float(probs[i])} for i in order]


def decode_detections(
    rows: NDArray[Any],
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    score_threshold: float = SCORE_THRESHOLD,
    iou_threshold: float = IOU_THRESHOLD,
) -> list[dict[str, Any]]:
    """Decode YOLO rows ``[cx, cy, w, h, obj, class scores...]`` into NMS-filtered boxes in original pixels."""
    rows = rows.reshape(-1, rows.shape[-1])
    class_scores = rows[:, 5:]
    class_ids = class_scores.argmax(axis=1)
    scores = rows[:, 4] * class_scores[np.arange(len(rows)), class_ids]
    keep = scores >= score_threshold
    rows, class_ids, scores = rows[keep], class_ids[keep], scores[keep]
    sx = original_size[0] / input_size[0]
    sy = original_size[1] / input_size[1]
    x1 = (rows[:, 0] - rows[:, 2] / 2) * sx
    y1 = (rows[:, 1] - rows[:, 3] / 2) * sy
    x2 = (rows[:, 0] + rows[:, 2] / 2) * sx
    y2 = (rows[:, 1] + rows[:, 3] / 2) * sy
    boxes = np.stack([x1, y1, x2, y2], axis=1)
    chosen = nms(boxes, scores, class_ids, iou_threshold)
    return [
        {
            "box": [round(float(v), 2) for v in boxes[i]],
            "class_id": int(class_ids[i]),
            "score": round(float(scores[i]), 4),
        }
        for i in chosen
    ]


def nms(boxes: NDArray[Any], scores: NDArray[Any], classes: NDArray[Any], iou_threshold: float) -> list[int]:
    """Greedy per-class non-maximum suppression; indices of kept boxes, best first."""
    order = list(np.argsort(-scores))
    kept: list[int] = []
    areas = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    while order:
        best = order.pop(0)
        kept.append(int(best))
        if not order:
            break
        rest = np.array(order)
        xx1 = np.maximum(boxes[best, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[best, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[best, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[best, 3], boxes[rest, 3])
        inter = (xx2 - xx1).clip(0) * (yy2 - yy1).clip(0)
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        suppressed = (iou > iou_threshold) & (classes[rest] == classes[best])
        order = [int(i) for i, s in zip(rest, suppressed, strict=True) if not s]
    return kept
