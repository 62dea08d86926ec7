"""The model catalog's pure parts: specs from Triton configs, and pre/post-processing per kind."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

from devstack.samples import sample_image
from worker.errors import PermanentJobError
from worker.images import DecodeLimits
from worker.models import ModelSpec, Tensor, decode_detections, nms, parse_params, top_k

LIMITS = DecodeLimits(max_bytes=10**7, max_pixels=10**7)


def config(name: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "max_batch_size": 8, "input": inputs, "output": outputs, **extra}


IMAGE = config(
    "enhance",
    [{"name": "image", "data_type": "TYPE_UINT8", "dims": ["-1", "-1", "3"]}],
    [{"name": "output", "data_type": "TYPE_UINT8", "dims": ["-1", "-1", "3"]}],
)
EMBEDDING = config(
    "embedding",
    [{"name": "image", "data_type": "TYPE_FP32", "dims": ["3", "224", "224"]}],
    [{"name": "embedding", "data_type": "TYPE_FP32", "dims": ["512"]}],
)


def test_spec_from_triton_config() -> None:
    spec = ModelSpec.from_triton_config(IMAGE)
    assert (spec.kind, spec.input.name, spec.input.wire_dtype, spec.output.name) == (
        "image",
        "image",
        "UINT8",
        "output",
    )
    assert spec.input.dims == (-1, -1, 3)
    assert spec.batched


def test_a_config_entry_declares_the_kind_of_a_new_model() -> None:
    custom = dict(EMBEDDING, name="my_clip", parameters={"tritonq_kind": {"string_value": "embedding"}})
    assert ModelSpec.from_triton_config(custom).kind == "embedding"
    with pytest.raises(ValueError, match="unknown kind"):
        ModelSpec.from_triton_config(dict(EMBEDDING, name="mystery"))


def test_image_models_round_trip_and_choose_their_format() -> None:
    spec = ModelSpec.from_triton_config(IMAGE)
    prepared = spec.preprocess(sample_image(40, 30), LIMITS, {})
    assert prepared.array.shape == (30, 40, 3)
    opaque = spec.postprocess(prepared.array, prepared, "")
    assert (opaque.extension, opaque.content_type) == ("jpg", "image/jpeg")
    rgba = np.zeros((30, 40, 4), np.uint8)
    with Image.open(io.BytesIO(spec.postprocess(rgba, prepared, "").data)) as image:
        assert image.mode == "RGBA"
    with pytest.raises(PermanentJobError):
        spec.postprocess(prepared.array, prepared, "json")


def test_upscale_scale_is_checked() -> None:
    spec = ModelSpec.from_triton_config(dict(IMAGE, name="upscale"))
    assert spec.preprocess(sample_image(8, 8), LIMITS, {"scale": "4"}).parameters == {"scale": "4"}
    assert spec.preprocess(sample_image(8, 8), LIMITS, {}).parameters == {"scale": "2"}
    with pytest.raises(PermanentJobError):
        spec.preprocess(sample_image(8, 8), LIMITS, {"scale": "3"})


def test_embeddings_are_written_as_json_or_npy() -> None:
    spec = ModelSpec.from_triton_config(EMBEDDING)
    prepared = spec.preprocess(sample_image(500, 300), LIMITS, {})
    assert prepared.array.shape == (3, 224, 224)
    assert prepared.original_size == (500, 300)
    vector = np.linspace(-1, 1, 512, dtype=np.float32)
    written = spec.postprocess(vector, prepared, "json")
    # Never "json" alone: "{job_id}.json" is the job's record.
    assert written.extension == "embedding.json"
    document = json.loads(written.data)
    assert document["dim"] == 512
    assert np.allclose(document["embedding"], vector)
    assert np.array_equal(np.load(io.BytesIO(spec.postprocess(vector, prepared, "npy").data)), vector)


def test_top_k_is_sorted_softmax() -> None:
    ranked = top_k(np.array([0.0, 5.0, 1.0, 3.0], np.float32), 3)
    assert [r["class_id"] for r in ranked] == [1, 3, 2]
    assert sum(r["score"] for r in top_k(np.zeros(10, np.float32), 10)) == pytest.approx(1.0)


def test_detections_are_thresholded_scaled_and_suppressed() -> None:
    rows = np.zeros((6, 7), np.float32)  # cx, cy, w, h, obj, two classes
    rows[0] = [100, 100, 50, 50, 0.9, 1.0, 0.0]
    rows[1] = [102, 101, 50, 50, 0.8, 1.0, 0.0]  # overlaps row 0, same class: suppressed
    rows[2] = [102, 101, 50, 50, 0.8, 0.0, 1.0]  # overlaps, other class: kept
    rows[3] = [300, 300, 20, 20, 0.1, 1.0, 0.0]  # below the score threshold
    boxes = decode_detections(rows, input_size=(640, 640), original_size=(1280, 320))
    assert [b["class_id"] for b in boxes] == [0, 1]
    assert boxes[0]["box"] == [150.0, 37.5, 250.0, 62.5]


def test_nms_keeps_disjoint_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    assert nms(boxes, np.array([0.5, 0.9]), np.array([0, 0]), 0.5) == [1, 0]


def test_image_inputs_are_padded_to_a_bucket_and_outputs_cropped_back() -> None:
    spec = ModelSpec.from_triton_config(IMAGE)
    prepared = spec.preprocess(sample_image(300, 200), LIMITS, {}, buckets=(256, 512))
    assert prepared.array.shape == (256, 512, 3)
    with Image.open(io.BytesIO(spec.postprocess(prepared.array, prepared, "png").data)) as image:
        assert image.size == (300, 200)
    opted_out = ModelSpec.from_triton_config(dict(IMAGE, parameters={"tritonq_shape_buckets": {"string_value": "off"}}))
    assert opted_out.preprocess(sample_image(300, 200), LIMITS, {}, buckets=(256, 512)).array.shape == (200, 300, 3)


def test_pixels_held_counts_image_outputs_at_their_scale() -> None:
    hwc = Tensor("image", "TYPE_UINT8", (-1, -1, 3))
    image = ModelSpec("upscale", "image", hwc, hwc, 8, declared=parse_params("scale=2|4"))
    assert image.pixels_held(100, 50, {"scale": "4"}) == 5000 * 17
    assert image.pixels_held(100, 50, {}) == 5000 * 5  # upscale's default scale is 2
    enhance = ModelSpec("enhance", "image", image.input, image.output, 8)
    assert enhance.pixels_held(100, 50, {}) == 5000 * 2
    chw, vector = Tensor("x", "TYPE_FP32", (3, 224, 224)), Tensor("e", "TYPE_FP32", (512,))
    embedding = ModelSpec("embedding", "embedding", chw, vector, 8)
    assert embedding.pixels_held(100, 50, {}) == 5000


def param_error(spec: ModelSpec, params: dict[str, str]) -> str:
    with pytest.raises(PermanentJobError) as caught:
        spec.request_parameters(params)
    return caught.value.code


def test_params_are_declared_per_model_and_nothing_else_reaches_triton() -> None:
    enhance = ModelSpec.from_triton_config(IMAGE)
    upscale = ModelSpec.from_triton_config(dict(IMAGE, name="upscale"))
    # A weight of a billion pixels, a value the model would choke on, names Triton reads itself, a forged trace.
    for params in ({"scale": "1000"}, {"sequence_id": "7"}, {"triton_enable_empty_final_response": "1"}):
        assert param_error(enhance, params) == "invalid_param"
    assert param_error(enhance, {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}) == "invalid_param"
    for scale in ("1000", "abc", "", "3"):
        assert param_error(upscale, {"scale": scale}) == "invalid_param"
    assert upscale.request_parameters({"scale": "4"}) == {"scale": "4"}
    assert upscale.request_parameters({}) == {"scale": "2"}  # the first choice is the default
    # The worker's own param is accepted everywhere and never forwarded.
    assert enhance.request_parameters({"preprocess": "server"}) == {}
    assert param_error(enhance, {"preprocess": "gpu"}) == "invalid_param"
    prepared = enhance.preprocess(sample_image(16, 16), LIMITS, {"preprocess": "worker"})
    assert prepared.parameters == {}
    with pytest.raises(PermanentJobError, match="invalid_param"):
        enhance.pixels_held(100, 100, {"scale": "1000"})


def test_a_config_declares_its_params_as_choices_or_integer_ranges() -> None:
    declared = {"tritonq_params": {"string_value": "strength=0..100; style=soft|hard"}}
    spec = ModelSpec.from_triton_config(dict(IMAGE, parameters=declared))
    assert spec.request_parameters({"strength": "100", "style": "hard"}) == {"strength": "100", "style": "hard"}
    assert spec.request_parameters({}) == {"style": "soft"}  # a range has no default: absent stays absent
    for value in ("101", "-1", "1e3", "0x10", " 5", "5\n", "9" * 30):
        assert param_error(spec, {"strength": value}) == "invalid_param"
    for text in ("strength", "strength=", "strength=5..1", "strength=a..b"):
        with pytest.raises(ValueError, match="tritonq_params"):
            ModelSpec.from_triton_config(dict(IMAGE, parameters={"tritonq_params": {"string_value": text}}))
