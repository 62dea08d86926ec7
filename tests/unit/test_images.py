"""Pure image work: decoding with limits, orientation, tensor layout, encoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from worker import images
from worker.demo import sample_image
from worker.errors import PermanentJobError

LIMITS = images.DecodeLimits(max_bytes=5_000_000, max_pixels=2_000_000)


def encoded(width: int, height: int, fmt: str = "PNG", mode: str = "RGB", **save: object) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), "red" if mode != "L" else 128).save(out, fmt, **save)
    return out.getvalue()


def code(data: bytes, limits: images.DecodeLimits = LIMITS) -> str:
    with pytest.raises(PermanentJobError) as caught:
        images.decode(data, limits)
    return caught.value.code


def header_code(data: bytes, limits: images.DecodeLimits = LIMITS) -> str:
    """The code ``probe`` (header only) gives, asserted equal to the one decoding gives."""
    with pytest.raises(PermanentJobError) as caught:
        images.probe(data, limits)
    assert caught.value.code == code(data, limits)
    return caught.value.code


def test_decodes_to_rgb_hwc_uint8() -> None:
    array = images.decode(sample_image(64, 48), LIMITS)
    assert array.shape == (48, 64, 3)
    assert array.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_become_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert images.decode(encoded(10, 7, fmt, mode), LIMITS).shape == (7, 10, 3)


def pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_jpegs_decode_to_the_pixels_pillow_gives(subsampling: int, progressive: bool) -> None:
    # libjpeg-turbo decodes plain JPEGs directly into numpy; the pixels must not change with it.
    out = io.BytesIO()
    photo = pillow_rgb(sample_image(301, 199))  # odd sizes: partial blocks at the edges
    Image.fromarray(photo).save(out, "JPEG", quality=85, subsampling=subsampling, progressive=progressive)
    assert np.array_equal(images.decode(out.getvalue(), LIMITS), pillow_rgb(out.getvalue()))


def test_only_upright_ycbcr_and_grey_jpegs_bypass_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    # CMYK and YCCK need Adobe's inverted inks, and a turned image its EXIF turn: Pillow does both.
    seen: list[bytes] = []
    decode_jpeg = images.simplejpeg.decode_jpeg

    def watched(data: bytes, **options: object) -> np.ndarray:
        seen.append(data)
        return decode_jpeg(data, **options)

    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", watched)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = encoded(40, 20, "JPEG", exif=exif.tobytes())
    plain, grey, cmyk = sample_image(64, 48), encoded(10, 7, "JPEG", "L"), encoded(10, 7, "JPEG", "CMYK")
    for data in (plain, grey, cmyk, turned, encoded(8, 8, "PNG")):
        images.decode(data, LIMITS)
    assert seen == [plain, grey]


def test_a_jpeg_whose_size_libjpeg_turbo_reads_otherwise_goes_through_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pixel limit is checked on Pillow's reading of the header; libjpeg-turbo decodes only what it also read.
    data = sample_image(64, 48)

    def refused(data: bytes, **options: object) -> np.ndarray:
        raise AssertionError("libjpeg-turbo decoded a JPEG whose size it read differently")

    monkeypatch.setattr(images.simplejpeg, "decode_jpeg_header", lambda data, **options: (4800, 6400, "YCbCr", "420"))
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", refused)
    assert images.decode(data, LIMITS).shape == (48, 64, 3)


def test_grey_jpegs_decode_to_rgb() -> None:
    grey = encoded(10, 7, "JPEG", "L")
    assert np.array_equal(images.decode(grey, LIMITS), pillow_rgb(grey))


def test_a_jpeg_with_stray_bytes_decodes_as_pillow_would() -> None:
    # Strict libjpeg-turbo refuses the two bytes before a marker; libjpeg only warns, and so does Pillow.
    data = sample_image(64, 48)
    marker = data.index(b"\xff\xdb")
    stray = data[:marker] + b"\x00\x00" + data[marker:]
    assert np.array_equal(images.decode(stray, LIMITS), pillow_rgb(data))


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = io.BytesIO()
    Image.new("RGB", (40, 20), "blue").save(out, "JPEG", exif=exif.tobytes())
    assert images.decode(out.getvalue(), LIMITS).shape == (40, 20, 3)


def test_refuses_what_is_not_an_image() -> None:
    assert header_code(b"") == "not_an_image"
    assert header_code(b"hello, world") == "not_an_image"


def test_refuses_a_truncated_jpeg() -> None:
    data = sample_image(256, 256)
    assert code(data[: len(data) // 2]) == "corrupt_image"


def test_refuses_formats_off_the_allowlist() -> None:
    assert header_code(encoded(8, 8, "ICO")) == "not_an_image"


def test_refuses_too_many_pixels_before_decoding() -> None:
    # A 30000x30000 PNG compresses to a few hundred KB; the header check refuses it unread.
    bomb = encoded(30_000, 30_000, "PNG", mode="L", optimize=False)
    assert len(bomb) < LIMITS.max_bytes
    assert header_code(bomb) == "too_large"


def test_pillows_own_bomb_guard_is_a_job_error_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow raises DecompressionBombError from the header past twice its MAX_IMAGE_PIXELS.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert header_code(encoded(100, 100)) == "too_large"


def test_refuses_too_many_bytes() -> None:
    assert header_code(sample_image(64, 64), images.DecodeLimits(max_bytes=100, max_pixels=10**6)) == "too_large"


def test_probe_reads_the_size_from_the_header() -> None:
    assert images.probe(sample_image(64, 48), LIMITS) == (64, 48)


def test_draft_mode_decodes_large_jpegs_smaller() -> None:
    array = images.decode(sample_image(1024, 1024), LIMITS, draft_size=(224, 224))
    assert 224 <= array.shape[0] < 1024


def test_chw_float_layout() -> None:
    tensor = images.to_chw_float(np.full((30, 40, 3), 255, np.uint8), (16, 8))
    assert tensor.shape == (3, 8, 16)
    assert tensor.dtype == np.float32
    assert np.allclose(tensor, 1.0)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_encode_round_trips(fmt: str) -> None:
    array = images.decode(sample_image(50, 30), LIMITS)
    with Image.open(io.BytesIO(images.encode(array, fmt))) as image:
        assert image.size == (50, 30)
        assert image.format == images.ENCODERS[fmt][0]


def test_jpeg_encoding_keeps_the_image() -> None:
    array = images.decode(sample_image(96, 64), LIMITS)
    decoded = pillow_rgb(images.encode(array, "jpeg")).astype(np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((decoded - array) ** 2))
    assert psnr > 35
    # A crop is a view with gaps between its rows: it encodes as its copy does.
    crop = array[:40, :50]
    assert not crop.flags.c_contiguous
    assert images.encode(crop, "jpeg") == images.encode(np.ascontiguousarray(crop), "jpeg")


def test_alpha_needs_a_format_that_carries_it() -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    with Image.open(io.BytesIO(images.encode(rgba, "png"))) as image:
        assert image.mode == "RGBA"
    with pytest.raises(PermanentJobError):
        images.encode(rgba, "jpeg")


def test_bucketing_pads_to_few_shapes_and_crops_back() -> None:
    buckets = (256, 512, 1024)
    assert [images.bucket_size(s, buckets) for s in (1, 256, 257, 1024, 1025, 2500)] == [
        256,
        256,
        512,
        1024,
        2048,
        3072,
    ]
    image = np.arange(300 * 200 * 3, dtype=np.uint32).reshape(300, 200, 3).astype(np.uint8)
    padded = images.pad_to_bucket(image, buckets)
    assert padded.shape == (512, 256, 3)
    assert np.array_equal(padded[:300, :200], image)
    assert np.array_equal(padded[400, 100], image[-1, 100])  # the edge repeats, not black
    doubled = np.repeat(np.repeat(padded, 2, axis=0), 2, axis=1)  # a 2x upscale of the padded input
    assert images.crop_output(doubled, (300, 200), (512, 256)).shape == (600, 400, 3)
    assert images.pad_to_bucket(padded, buckets) is padded
