"""The real Triton serving the committed cpu model repository: every model and version READY, one
inference per model with the contract's shapes and properties, errors per request, dynamic batching,
the ensemble, and adding (then rolling back) a version with explicit model control.

Uses the session fixture ``triton`` (tests/conftest.py: Triton started through ``devstack/stack.py`` on
``triton/model_repository``, exposing ``grpc_url``, ``http_url`` and ``metrics_url``). The model list
comes from ``triton/scripts/render_repository.py``, the single source of truth of the repository.
"""

from __future__ import annotations

import importlib.util
import queue
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "triton" / "model_repository"


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


render_repository = _load("render_repository", ROOT / "triton" / "scripts" / "render_repository.py")


@pytest.fixture(scope="module")
def client(triton: Any) -> grpcclient.InferenceServerClient:
    c = grpcclient.InferenceServerClient(url=triton.grpc_url)
    yield c
    c.close()


def infer(
    client: grpcclient.InferenceServerClient,
    model: str,
    inputs: dict[str, NDArray[Any]],
    version: str = "",
    parameters: dict[str, Any] | None = None,
) -> grpcclient.InferResult:
    tensors = []
    for name, array in inputs.items():
        dtype = "BYTES" if array.dtype == np.object_ else {"uint8": "UINT8", "float32": "FP32"}[str(array.dtype)]
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    return client.infer(model, tensors, model_version=version, parameters=parameters)


def scene(h: int = 96, w: int = 128) -> NDArray[Any]:
    """A deterministic test photo: a soft grey-blue backdrop with a red disc and a green square on it."""
    rng = np.random.default_rng(7)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (190, 200, 215)
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    cv2.circle(img, (w // 3, h // 2), h // 4, (200, 30, 40), -1)
    cv2.rectangle(img, (w // 2 + 8, h // 4), (w // 2 + 36, h // 4 + 28), (30, 160, 60), -1)
    return img


def gradient(h: int = 96, w: int = 128) -> NDArray[Any]:
    """A deterministic low-contrast, mid-tone photo: where contrast and gamma changes show most."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([60 + xx * 0.8, 70 + yy * 0.9, 110 + (xx + yy) * 0.3], axis=-1)
    noisy: NDArray[Any] = img + np.random.default_rng(3).normal(0, 4, img.shape)
    return noisy.clip(0, 255).astype(np.uint8)


def face_image() -> NDArray[Any]:
    """[3, 640, 640] float in [0, 1] with two drawn faces that OpenCV's frontal-face cascade detects."""
    img = np.full((640, 640, 3), 200, np.uint8)
    for cx, cy, s in ((200, 250, 1.0), (460, 400, 1.4)):
        cv2.ellipse(img, (cx, cy), (int(60 * s), int(80 * s)), 0, 0, 360, (190, 160, 140), -1)
        for dx in (-25, 25):
            cv2.ellipse(
                img, (cx + int(dx * s), cy - int(20 * s)), (int(14 * s), int(7 * s)), 0, 0, 360, (40, 30, 30), -1
            )
            brow = (cx + int((dx - 16) * s), cy - int(38 * s)), (cx + int((dx + 16) * s), cy - int(38 * s))
            cv2.line(img, *brow, (60, 40, 30), max(1, int(5 * s)))
        cv2.line(img, (cx, cy - int(10 * s)), (cx, cy + int(20 * s)), (150, 110, 100), max(1, int(4 * s)))
        cv2.ellipse(img, (cx, cy + int(42 * s)), (int(24 * s), int(8 * s)), 0, 0, 360, (120, 50, 50), -1)
    return (img.astype(np.float32) / 255.0).transpose(2, 0, 1)


def test_every_model_and_version_is_ready(client: grpcclient.InferenceServerClient) -> None:
    expected = {(m.name, str(v)) for m in render_repository.MODELS for v in m.versions}
    index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert {key: index.get(key) for key in expected} == dict.fromkeys(expected, "READY")
    for name, version in expected:
        assert client.is_model_ready(name, version), (name, version)


@pytest.mark.parametrize("model", render_repository.MODELS, ids=lambda m: m.name)
def test_served_config_is_the_rendered_one(client: grpcclient.InferenceServerClient, model: Any) -> None:
    """Triton's view of each model (after its auto-complete) keeps the tensors and batching we rendered."""
    served = client.get_model_config(model.name, as_json=True)["config"]
    assert int(served["max_batch_size"]) == model.max_batch_size
    for declared, tensors in ((served["input"], model.inputs), (served["output"], model.outputs)):
        got = [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in declared]
        assert got == [(t.name, t.data_type, list(t.dims)) for t in tensors]
    if model.batching is not None:
        batcher = served["dynamic_batching"]
        assert [int(b) for b in batcher["preferred_batch_size"]] == model.batching.preferred.cpu
        assert int(batcher["priority_levels"]) == 3


@pytest.mark.parametrize("scale", [2, 4])
def test_upscale_multiplies_both_sides_by_the_scale(client: grpcclient.InferenceServerClient, scale: int) -> None:
    image = scene()[None]
    out = infer(client, "upscale", {"image": image}, parameters={"scale": scale}).as_numpy("output")
    assert out.shape == (1, 96 * scale, 128 * scale, 3) and out.dtype == np.uint8
    # Bicubic: the colour far inside the disc survives the upscaling.
    assert np.abs(out[0, 48 * scale, 42 * scale].astype(int) - image[0, 48, 42]).max() < 12


def test_upscale_defaults_to_2_and_rejects_other_scales(client: grpcclient.InferenceServerClient) -> None:
    out = infer(client, "upscale", {"image": scene(20, 30)[None]}).as_numpy("output")
    assert out.shape == (1, 40, 60, 3)
    with pytest.raises(InferenceServerException, match="scale") as excinfo:
        infer(client, "upscale", {"image": scene(20, 30)[None]}, parameters={"scale": 3})
    assert "INVALID_ARG" in str(excinfo.value.status()) or "INVALID_ARGUMENT" in str(excinfo.value.status())


def test_enhance_versions_1_and_2_both_serve_and_differ(client: grpcclient.InferenceServerClient) -> None:
    image = gradient()[None]
    v1 = infer(client, "enhance", {"image": image}, version="1").as_numpy("output")
    v2 = infer(client, "enhance", {"image": image}, version="2").as_numpy("output")
    assert v1.shape == v2.shape == image.shape
    assert np.abs(v1.astype(int) - image.astype(int)).mean() > 10  # visibly enhanced
    assert np.abs(v1.astype(int) - v2.astype(int)).mean() > 5  # and differently


def test_background_remove_returns_rgba_with_a_real_alpha_mask(client: grpcclient.InferenceServerClient) -> None:
    image = scene()[None]
    out = infer(client, "background_remove", {"image": image}).as_numpy("output")
    assert out.shape == (1, 96, 128, 4)
    alpha = out[0, :, :, 3]
    assert np.array_equal(out[0, :, :, :3], image[0])
    assert alpha[48, 42] == 255 and alpha[2, 2] == 0 and alpha[-3, -3] == 0
    assert 0.1 < (alpha > 127).mean() < 0.5


@pytest.mark.parametrize("model", ["style_comic", "style_aged"])
def test_style_models_transform_visibly_and_deterministically(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    image = scene()[None]
    first = infer(client, model, {"image": image}).as_numpy("output")
    second = infer(client, model, {"image": image}).as_numpy("output")
    assert first.shape == image.shape and first.dtype == np.uint8
    assert np.array_equal(first, second)
    assert np.abs(first.astype(int) - image.astype(int)).mean() > 10


def test_embedding_is_l2_normalised(client: grpcclient.InferenceServerClient) -> None:
    batch = np.random.default_rng(0).random((3, 3, 224, 224), dtype=np.float32)
    out = infer(client, "embedding", {"image": batch}).as_numpy("embedding")
    assert out.shape == (3, 512) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_resnet50_returns_1000_logits(client: grpcclient.InferenceServerClient) -> None:
    batch = np.random.default_rng(1).standard_normal((2, 3, 224, 224), dtype=np.float32)
    out = infer(client, "resnet50", {"input": batch}).as_numpy("output")
    assert out.shape == (2, 1000) and np.isfinite(out).all()


def test_pcb_detector_emits_yolo_rows_for_real_detections(client: grpcclient.InferenceServerClient) -> None:
    out = infer(client, "pcb_detector", {"images": face_image()[None]}).as_numpy("output")
    assert out.shape == (1, 25200, 85)
    rows = out[0][out[0, :, 4] > 0]
    assert len(rows) >= 2
    assert (rows[:, 5] == 1.0).all()  # class 0 (person: faces)
    centres = sorted((round(float(r[0]), -1), round(float(r[1]), -1)) for r in rows[:, :2])
    assert any(abs(cx - 200) < 40 and abs(cy - 250) < 40 for cx, cy in centres)
    assert not out[0, len(rows) :].any()  # unused rows are zero


def test_pcb_detector_finds_nothing_on_a_blank_board(client: grpcclient.InferenceServerClient) -> None:
    out = infer(client, "pcb_detector", {"images": np.full((1, 3, 640, 640), 0.5, np.float32)}).as_numpy("output")
    assert not out.any()


def test_enhance_bytes_ensemble_equals_the_client_side_path(client: grpcclient.InferenceServerClient) -> None:
    image = scene()
    ok, png = cv2.imencode(".png", image[:, :, ::-1])
    assert ok
    out = infer(client, "enhance_bytes", {"image_bytes": np.array([[png.tobytes()]], dtype=np.object_)})
    encoded = out.as_numpy("output_bytes")
    assert encoded.shape == (1, 1)
    decoded = cv2.imdecode(np.frombuffer(encoded[0, 0], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    direct = infer(client, "enhance", {"image": image[None]}, version="1").as_numpy("output")[0]
    assert np.array_equal(decoded, direct)  # PNG is lossless: server-side == client-side preprocessing


def test_enhance_bytes_rejects_bytes_that_are_not_an_image(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="not a decodable image"):
        infer(client, "enhance_bytes", {"image_bytes": np.array([[b"not an image"]], dtype=np.object_)})


@pytest.mark.parametrize("model", ["upscale", "enhance", "background_remove", "style_comic", "style_aged"])
def test_dynamic_batcher_forms_batches_under_concurrent_load(triton: Any, model: str) -> None:
    """32 requests in flight at once: Triton executes them in fewer, larger batches (average above 2)."""
    c = grpcclient.InferenceServerClient(url=triton.grpc_url)
    try:

        def counts() -> tuple[int, int]:
            (stats,) = c.get_inference_statistics(model, "1", as_json=True)["model_stats"]
            return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

        before = counts()
        done: queue.Queue[Any] = queue.Queue()
        image = scene(64, 64)[None]
        for _ in range(32):
            t = grpcclient.InferInput("image", list(image.shape), "UINT8")
            t.set_data_from_numpy(image)
            c.async_infer(model, [t], model_version="1", callback=lambda result, error: done.put(error or result))
        results = [done.get(timeout=60) for _ in range(32)]
        assert not [r for r in results if isinstance(r, Exception)]
        # Triton records a batch's statistics after its responses are sent: wait for the last batch's.
        deadline = time.monotonic() + 10
        after = counts()
        while after[0] - before[0] < 32 and time.monotonic() < deadline:
            time.sleep(0.05)
            after = counts()
        inferences, executions = after[0] - before[0], after[1] - before[1]
        assert inferences == 32
        assert inferences / executions > 2, (inferences, executions)
    finally:
        c.close()


def test_version_3_loads_and_rolls_back_without_restart(tmp_path: Path) -> None:
    """The README's procedure, for real: add enhance/3, load it (explicit model control), roll it back."""
    from devstack.components import Triton

    repo = tmp_path / "repo"
    shutil.copytree(REPOSITORY / "enhance", repo / "enhance", ignore=shutil.ignore_patterns("__pycache__"))
    server = Triton("triton-versions", tmp_path / "logs", model_repository=repo)
    server.start()
    c = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        assert c.is_model_ready("enhance", "1") and c.is_model_ready("enhance", "2")
        assert not c.is_model_ready("enhance", "3")
        # 1. add the version folder; 2. list it in version_policy; 3. load_model.
        shutil.copytree(repo / "enhance" / "2", repo / "enhance" / "3")
        config = repo / "enhance" / "config.pbtxt"
        original = config.read_text()
        config.write_text(original.replace("versions: [ 1, 2 ]", "versions: [ 1, 2, 3 ]"))
        c.load_model("enhance")
        assert all(c.is_model_ready("enhance", v) for v in ("1", "2", "3"))
        out = infer(c, "enhance", {"image": scene(32, 32)[None]}, version="3").as_numpy("output")
        assert out.shape == (1, 32, 32, 3)
        # Roll back: the old config again, load_model again: version 3 unloads, 1 and 2 still serve.
        config.write_text(original)
        c.load_model("enhance")
        assert not c.is_model_ready("enhance", "3")
        assert c.is_model_ready("enhance", "1") and c.is_model_ready("enhance", "2")
    finally:
        c.close()
        server.stop()


def test_gpu_profile_loads_in_real_triton_except_what_needs_a_gpu(tmp_path: Path) -> None:
    """The rendered gpu repository, served by the same Triton: every model that does not need a GPU
    (all but the KIND_GPU onnxruntime models, which need a GPU and Triton's onnxruntime backend) loads
    READY with the gpu profile's batching and queue settings, and the gpu-only ones are refused cleanly."""
    from devstack.components import Triton

    repo = tmp_path / "gpu"
    render_repository.render("gpu", repo)
    needs_gpu = {m.name for m in render_repository.MODELS if m.gpu_device}
    for name in needs_gpu:
        shutil.rmtree(repo / name)
    server = Triton("triton-gpu-profile", tmp_path / "logs", model_repository=repo)
    server.start()
    c = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        expected = {(m.name, str(v)) for m in render_repository.MODELS if m.name not in needs_gpu for v in m.versions}
        index = {(m.name, m.version): m.state for m in c.get_model_repository_index().models}
        assert {key: index.get(key) for key in expected} == dict.fromkeys(expected, "READY")
        batcher = c.get_model_config("enhance", as_json=True)["config"]["dynamic_batching"]
        assert [int(b) for b in batcher["preferred_batch_size"]] == render_repository.model(
            "enhance"
        ).batching.preferred.gpu
        assert int(batcher["default_queue_policy"]["max_queue_size"]) == render_repository.GPU_MAX_QUEUE_SIZE
        out = infer(
            c,
            "enhance_bytes",
            {"image_bytes": np.array([[cv2.imencode(".png", scene(16, 16))[1].tobytes()]], dtype=np.object_)},
        )
        assert out.as_numpy("output_bytes").shape == (1, 1)
    finally:
        c.close()
        server.stop()
