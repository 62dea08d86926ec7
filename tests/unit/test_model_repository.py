"""The Triton model repository without a server: rendered configs (both profiles) against the committed
ones and against Triton's own ModelConfig protobuf, the reproducible ONNX export, and every model's
numpy code called directly (``model.py`` imported with a stub ``triton_python_backend_utils``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pytest
from google.protobuf import text_format
from numpy.typing import NDArray
from tritonclient.grpc import model_config_pb2

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "triton" / "model_repository"
SCRIPTS = ROOT / "triton" / "scripts"


# --- a stub of the Python backend's utilities, enough to run execute() ------------------------------


class _Tensor:
    def __init__(self, name: str, array: NDArray[Any]) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> NDArray[Any]:
        return self.array


class _TritonError(Exception):
    INVALID_ARG = 3

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.message, self.code = message, code


class _Response:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: _TritonError | None = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


class _Request:
    def __init__(self, inputs: dict[str, NDArray[Any]], parameters: dict[str, Any] | None = None) -> None:
        self.inputs, self._parameters = inputs, parameters or {}

    def parameters(self) -> str:
        return json.dumps(self._parameters)  # the Python backend hands parameters over as JSON text


def _stub_pb_utils() -> ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _Tensor  # type: ignore[attr-defined]
    pb.TritonError = _TritonError  # type: ignore[attr-defined]
    pb.InferenceResponse = _Response  # type: ignore[attr-defined]
    pb.get_input_tensor_by_name = lambda request, name: _Tensor(name, request.inputs[name])  # type: ignore[attr-defined]
    return pb


def _load(name: str, path: Path) -> ModuleType:
    sys.modules.setdefault("triton_python_backend_utils", _stub_pb_utils())
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _model(name: str, version: int = 1) -> ModuleType:
    return _load(f"tritonq_model_{name}_{version}", REPOSITORY / name / str(version) / "model.py")


def _instance(name: str, version: int = 1) -> Any:
    """An initialised TritonPythonModel, with the committed config, as Triton would load it."""
    config = text_format.Parse((REPOSITORY / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    from google.protobuf.json_format import MessageToDict

    args = {
        "model_config": json.dumps(MessageToDict(config, preserving_proto_field_name=True)),
        "model_repository": str(REPOSITORY / name),
        "model_version": str(version),
    }
    instance = _model(name, version).TritonPythonModel()
    instance.initialize(args)
    return instance


render_repository = _load("render_repository", SCRIPTS / "render_repository.py")
export_models = sys.modules["export_models"]  # imported by the renderer from the same folder


def scene(h: int = 60, w: int = 80) -> NDArray[Any]:
    """Backdrop with mild noise, a red disc and a green square: [H, W, 3] uint8."""
    rng = np.random.default_rng(7)
    img = np.clip(np.full((h, w, 3), (190, 200, 215), np.float64) + rng.normal(0, 3, (h, w, 3)), 0, 255)
    img = img.astype(np.uint8)
    cv2.circle(img, (w // 3, h // 2), h // 4, (200, 30, 40), -1)
    cv2.rectangle(img, (w // 2 + 8, h // 4), (w // 2 + 26, h // 4 + 18), (30, 160, 60), -1)
    return img


def gradient(h: int = 60, w: int = 80) -> NDArray[Any]:
    """A low-contrast, mid-tone photo: where contrast, gamma and colour changes show most."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([60 + xx * 1.2, 70 + yy * 1.4, 110 + (xx + yy) * 0.4], axis=-1)
    noisy: NDArray[Any] = img + np.random.default_rng(3).normal(0, 4, img.shape)
    return noisy.clip(0, 255).astype(np.uint8)


# --- the renderer -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("rendered")
    out = {}
    for profile in render_repository.PROFILES:
        out[profile] = base / profile
        render_repository.render(profile, out[profile])
    return out


def test_committed_cpu_repository_is_exactly_the_cpu_render(rendered: dict[str, Path]) -> None:
    fresh = rendered["cpu"]
    for m in render_repository.MODELS:
        assert (REPOSITORY / m.name / "config.pbtxt").read_bytes() == (fresh / m.name / "config.pbtxt").read_bytes(), (
            f"{m.name}/config.pbtxt is stale: run `make models`"
        )
    committed_dirs = {p.name for p in REPOSITORY.iterdir() if p.is_dir()}
    assert committed_dirs == {m.name for m in render_repository.MODELS}
    assert render_repository.differences() == []


def test_cpu_render_copies_the_committed_code(rendered: dict[str, Path]) -> None:
    for path in sorted(REPOSITORY.glob("*/*/model.py")):
        assert (rendered["cpu"] / path.relative_to(REPOSITORY)).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_every_rendered_config_parses_strictly_as_triton_model_config(rendered: dict[str, Path], profile: str) -> None:
    configs = sorted(rendered[profile].glob("*/config.pbtxt"))
    assert len(configs) == len(render_repository.MODELS)
    for path in configs:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())  # raises on unknown fields
        assert config.name == path.parent.name


def test_strict_parse_rejects_an_unknown_field() -> None:
    text = render_repository.render_config(render_repository.model("enhance"), "cpu")
    with pytest.raises(text_format.ParseError):
        text_format.Parse(
            text.replace("max_batch_size: 16", "max_batch_size: 16\nmax_batch: 4"), model_config_pb2.ModelConfig()
        )


def _parsed(rendered: dict[str, Path], profile: str, name: str) -> Any:
    return text_format.Parse((rendered[profile] / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_gpu_profile_serves_onnx_natively_on_the_gpu(rendered: dict[str, Path]) -> None:
    for name in ("embedding", "resnet50"):
        config = _parsed(rendered, "gpu", name)
        assert config.platform == "onnxruntime_onnx" and not config.backend
        (group,) = config.instance_group
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0]
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
        policy = config.dynamic_batching.default_queue_policy
        assert policy.default_timeout_microseconds > 0 and policy.max_queue_size > 0 and policy.allow_timeout_override
        version_dir = rendered["gpu"] / name / "1"
        assert sorted(p.name for p in version_dir.iterdir()) == ["model.onnx"]
        cpu = _parsed(rendered, "cpu", name)
        assert cpu.backend == "python" and cpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert (rendered["gpu"] / name / "1" / "model.onnx").read_bytes() == export_models.model_bytes(name)


def test_both_profiles_keep_the_contract_and_priorities(rendered: dict[str, Path]) -> None:
    for m in render_repository.MODELS:
        cpu, gpu = _parsed(rendered, "cpu", m.name), _parsed(rendered, "gpu", m.name)
        assert cpu.input == gpu.input and cpu.output == gpu.output and cpu.max_batch_size == gpu.max_batch_size
        assert cpu.version_policy == gpu.version_policy
        if m.kind == "image":
            for config in (cpu, gpu):
                assert config.dynamic_batching.priority_levels == 3
                assert config.dynamic_batching.default_priority_level == 2
                assert config.dynamic_batching.default_queue_policy.allow_timeout_override
                assert config.max_batch_size == 16


def test_embedding_config_follows_the_openclip_seed(rendered: dict[str, Path]) -> None:
    config = _parsed(rendered, "cpu", "embedding")
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000


def test_enhance_serves_versions_1_and_2_together() -> None:
    config = text_format.Parse((REPOSITORY / "enhance" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert list(config.version_policy.specific.versions) == [1, 2]


def test_cuda_graphs_are_refused_where_the_backend_cannot_honour_them() -> None:
    import dataclasses

    bad = dataclasses.replace(render_repository.model("embedding"), cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs"):
        render_repository.render_config(bad, "gpu")


def test_render_refuses_to_replace_a_folder_it_did_not_render(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        render_repository.render("gpu", tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# --- the ONNX export ----------------------------------------------------------------------------------


def test_export_is_reproducible_byte_for_byte() -> None:
    for name, version in export_models.ONNX_MODELS:
        first, second = export_models.model_bytes(name, version), export_models.model_bytes(name, version)
        assert first == second
        assert len(first) < 4 * 1024 * 1024  # small enough to never be a burden, git-ignored anyway


def test_ensure_models_is_idempotent_and_repairs_stale_files(tmp_path: Path) -> None:
    for name, _ in export_models.ONNX_MODELS:
        (tmp_path / name).mkdir()
    assert len(export_models.stale_models(tmp_path)) == len(export_models.ONNX_MODELS)
    export_models.ensure_models(tmp_path)
    assert export_models.stale_models(tmp_path) == []
    path = export_models.onnx_path(tmp_path, "embedding")
    before = path.stat().st_mtime_ns
    export_models.ensure_models(tmp_path)
    assert path.stat().st_mtime_ns == before  # identical file left alone
    path.write_bytes(b"truncated")
    export_models.ensure_models(tmp_path)
    assert path.read_bytes() == export_models.model_bytes("embedding")
    assert export_models.main(["--repository", str(tmp_path), "--check"]) == 0


def test_exported_files_are_readable_by_another_user(tmp_path: Path) -> None:
    # The Triton image copies them from a root build stage and serves them as uid 1000.
    for name, _ in export_models.ONNX_MODELS:
        (tmp_path / name).mkdir()
    export_models.ensure_models(tmp_path)
    for name, version in export_models.ONNX_MODELS:
        assert export_models.onnx_path(tmp_path, name, version).stat().st_mode & 0o777 == 0o644


# --- the models' code, called directly ----------------------------------------------------------------


def test_every_model_initialises_against_its_committed_config() -> None:
    """What Triton does at load: a config the code does not accept fails here, not at first request."""
    export_models.ensure_models(REPOSITORY)
    for m in render_repository.MODELS:
        for version in m.versions if m.backend != "ensemble" else ():
            _instance(m.name, version)


def test_initialize_fails_on_a_config_that_disagrees_with_the_code() -> None:
    bad = {"input": [{"name": "image", "data_type": "TYPE_UINT8", "dims": ["-1", "-1", "4"]}],
           "output": [{"name": "output", "data_type": "TYPE_UINT8", "dims": ["-1", "-1", "3"]}],
           "max_batch_size": 16}  # fmt: skip
    for name in ("upscale", "enhance", "style_comic", "style_aged", "background_remove"):
        with pytest.raises(ValueError):
            _model(name).TritonPythonModel().initialize({"model_config": json.dumps(bad)})


@pytest.mark.parametrize("scale", [2, 4])
def test_upscale_factor_and_bicubic_fidelity(scale: int) -> None:
    up = _model("upscale")
    batch = np.stack([scene(), scene()[::-1]])
    out = up.upscale(batch, scale)
    assert out.shape == (2, 60 * scale, 80 * scale, 3) and out.dtype == np.uint8
    flat = np.full((1, 7, 9, 3), 123, np.uint8)
    assert (up.upscale(flat, scale) == 123).all()  # a partition of unity: flat stays flat
    # Downsampling the upscaled image back by area averaging gives the original, nearly.
    back = out.reshape(2, 60, scale, 80, scale, 3).mean(axis=(2, 4))
    assert np.abs(back - batch).mean() < 3


def test_upscale_groups_by_scale_and_rejects_bad_scales_per_request() -> None:
    model = _instance("upscale")
    image = scene(10, 12)[None]
    requests = [_Request({"image": image}, {"scale": 4}), _Request({"image": image}, {"scale": 3}),
                _Request({"image": image}), _Request({"image": image}, {"scale": "4"})]  # fmt: skip
    r4, bad, default, r4s = model.execute(requests)
    assert r4.outputs["output"].shape == r4s.outputs["output"].shape == (1, 40, 48, 3)
    assert default.outputs["output"].shape == (1, 20, 24, 3)
    assert bad.error is not None and bad.error.code == _TritonError.INVALID_ARG and "scale" in bad.error.message
    for value in (True, 2.0, "x", None):
        with pytest.raises(ValueError):
            _model("upscale").parse_scale({"scale": value})


def test_background_remove_alpha_is_a_real_mask() -> None:
    out = _model("background_remove").remove_background(scene()[None])
    assert out.shape == (1, 60, 80, 4)
    alpha = out[0, :, :, 3]
    assert alpha[30, 26] == 255  # disc
    assert alpha[20, 64] == 255  # square
    assert alpha[2, 2] == 0 and alpha[-2, 40] == 0  # backdrop
    assert 0 < (alpha == 255).mean() < 0.5 and len(np.unique(alpha)) > 2  # soft edges, not all 255


def test_background_remove_handles_a_two_tone_backdrop() -> None:
    img = np.zeros((60, 80, 3), np.uint8)
    img[:, :40] = (240, 240, 240)
    img[:, 40:] = (30, 30, 60)
    cv2.circle(img, (40, 30), 12, (220, 180, 20), -1)
    alpha = _model("background_remove").alpha_mask(img[None])[0]
    assert alpha[30, 40] == 255 and alpha[5, 10] == 0 and alpha[5, 70] == 0


def test_styles_and_enhance_are_visibly_different_transforms() -> None:
    image = gradient()[None]
    outputs = {
        "enhance_1": _model("enhance", 1).enhance(image),
        "enhance_2": _model("enhance", 2).enhance(image),
        "comic": _model("style_comic").comic(image),
        "aged": _model("style_aged").age(image),
    }
    for name, out in outputs.items():
        assert out.shape == image.shape and out.dtype == np.uint8, name
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(outputs[a].astype(int) - outputs[b].astype(int)).mean() > 2, (a, b)
    comic = outputs["comic"]
    assert len(np.unique(comic.reshape(-1, 3), axis=0)) < 40  # posterised
    assert not (comic == 0).all(axis=-1).any()  # a smooth gradient has no edges to ink...
    inked = (_model("style_comic").comic(scene()[None])[0] == 0).all(axis=-1)
    assert inked[25:35, 8:14].any() and not inked[:5, :5].any()  # ...the disc's rim has, the backdrop not
    assert 0.01 < inked.mean() < 0.2
    aged = outputs["aged"][0].astype(float)
    assert aged[..., 0].mean() > aged[..., 2].mean()  # sepia: red over blue
    assert aged[25:35, 35:45].mean() > aged[:5, :5].mean() + 20  # vignette


def test_style_aged_output_does_not_depend_on_the_batch() -> None:
    aged = _model("style_aged")
    a, b = scene(), scene()[::-1].copy()
    alone = aged.age(a[None])[0]
    batched = aged.age(np.stack([b, a]))[1]
    assert np.array_equal(alone, batched)


def test_image_model_execute_splits_mixed_batches_back_per_request() -> None:
    model = _instance("style_comic")
    small, large = scene(20, 30), scene(40, 50)
    responses = model.execute([_Request({"image": np.stack([small, small])}), _Request({"image": large[None]}),
                               _Request({"image": small[None]})])  # fmt: skip
    assert [r.outputs["output"].shape for r in responses] == [(2, 20, 30, 3), (1, 40, 50, 3), (1, 20, 30, 3)]
    assert np.array_equal(responses[2].outputs["output"][0], responses[0].outputs["output"][0])


def test_embedding_model_outputs_unit_vectors() -> None:
    model = _instance("embedding")
    batch = np.random.default_rng(0).random((5, 3, 224, 224), dtype=np.float32)
    responses = model.execute([_Request({"image": batch[:2]}), _Request({"image": batch[2:]})])
    out = np.concatenate([r.outputs["embedding"] for r in responses])
    assert out.shape == (5, 512) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_resnet50_model_outputs_1000_logits() -> None:
    model = _instance("resnet50")
    (response,) = model.execute([_Request({"input": np.zeros((2, 3, 224, 224), np.float32)})])
    assert response.outputs["output"].shape == (2, 1000)


def test_onnx_wrapper_refuses_a_config_that_disagrees_with_the_graph() -> None:
    wrapper = _model("embedding")
    config = {"input": [{"name": "image", "data_type": "TYPE_FP32", "dims": ["3", "256", "256"]}],
              "output": [{"name": "embedding", "data_type": "TYPE_FP32", "dims": ["512"]}]}  # fmt: skip
    with pytest.raises(ValueError, match="dims"):
        wrapper.open_session(export_models.onnx_path(REPOSITORY, "embedding"), config)
    with pytest.raises(FileNotFoundError, match="make models"):
        wrapper.open_session(REPOSITORY / "embedding" / "9" / "model.onnx", config)


def test_detector_emits_yolo_rows_for_a_detected_face() -> None:
    img = np.full((640, 640, 3), 200, np.uint8)
    cx, cy = 320, 300
    cv2.ellipse(img, (cx, cy), (60, 80), 0, 0, 360, (190, 160, 140), -1)
    for dx in (-25, 25):
        cv2.ellipse(img, (cx + dx, cy - 20), (14, 7), 0, 0, 360, (40, 30, 30), -1)
        cv2.line(img, (cx + dx - 16, cy - 38), (cx + dx + 16, cy - 38), (60, 40, 30), 5)
    cv2.line(img, (cx, cy - 10), (cx, cy + 20), (150, 110, 100), 4)
    cv2.ellipse(img, (cx, cy + 42), (24, 8), 0, 0, 360, (120, 50, 50), -1)
    images = np.stack([img, np.full_like(img, 128)]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    out = _model("pcb_detector").Detector().detect(images)
    assert out.shape == (2, 25200, 85) and out.dtype == np.float32
    rows = out[0][out[0, :, 4] > 0]
    assert len(rows) >= 1 and not out[0, len(rows) :].any()
    best = rows[rows[:, 4].argmax()]
    assert abs(best[0] - cx) < 30 and abs(best[1] - cy) < 30 and best[5] == 1.0 and best[4] > 0.5
    assert not out[1].any()  # nothing on a blank board


def test_decode_encode_round_trip_and_limits() -> None:
    decode, encode = _model("image_decode"), _model("image_encode")
    image = scene()
    png = encode.encode(image, "png")
    assert decode.header_size(png) == (80, 60)
    jpeg = encode.encode(image, "jpeg", 90)
    assert decode.header_size(jpeg) == (80, 60)
    assert np.array_equal(decode.decode(png), image)
    assert np.abs(decode.decode(jpeg).astype(int) - image).mean() < 6
    with pytest.raises(ValueError, match="limit"):
        decode.decode(png, max_pixels=1000)
    with pytest.raises(ValueError, match="not a decodable image"):
        decode.decode(b"GIF89a nonsense")
    rows = np.array([[png], [encode.encode(scene(10, 10))]], dtype=np.object_)
    with pytest.raises(ValueError, match="share one size"):
        decode.decode_rows(rows)
    out = encode.encode_batch(np.stack([image, image]))
    assert out.shape == (2, 1) and out[0, 0] == png


def test_decode_model_fails_only_the_bad_request() -> None:
    model = _instance("image_decode")
    good = np.array([[_model("image_encode").encode(scene())]], dtype=np.object_)
    ok, bad = model.execute(
        [_Request({"image_bytes": good}), _Request({"image_bytes": np.array([[b"x"]], dtype=np.object_)})]
    )
    assert ok.outputs["image"].shape == (1, 60, 80, 3)
    assert bad.error is not None and bad.error.code == _TritonError.INVALID_ARG


def test_exported_models_are_readable_by_the_triton_uid(tmp_path: Path) -> None:
    # Triton runs as another uid than the export (the image's build runs as root).
    for name, _ in export_models.ONNX_MODELS:
        (tmp_path / name).mkdir()
    export_models.ensure_models(tmp_path)
    path = export_models.onnx_path(tmp_path, "embedding")
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o600)  # as an earlier export left it: identical bytes, private
    export_models.ensure_models(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o644
