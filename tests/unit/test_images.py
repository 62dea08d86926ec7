"""Pure image work: decoding with limits, orientation, tensor layout, encoding."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from chaos import bad_inputs
from devstack.samples import sample_image
from worker import images
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


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` grey pixels and holds a few: the header is what is checked."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")
    )


def test_refuses_too_many_pixels_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 30000x30000 PNG compresses to a few hundred KB; the header check refuses it unread.
    bomb = png_header(30_000, 30_000)
    monkeypatch.setattr(Image.Image, "load", never)
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


def progressive(extra_scans: int = 0, size: int = 64) -> bytes:
    """A progressive JPEG; ``extra_scans`` repeats its last scan that many times more before EOI."""
    out = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(io.BytesIO(sample_image(size, size))))).save(out, "JPEG", progressive=True)
    data = out.getvalue()
    last, end = data.rindex(b"\xff\xda"), len(data) - 2  # stuffing keeps FF DA out of entropy-coded data
    return data[:end] + data[last:end] * extra_scans + data[end:]


def never(*args: object, **kwargs: object) -> None:
    raise AssertionError("decoded an image that its header should have refused")


def test_jpeg_scans_are_counted_from_the_markers() -> None:
    plain = progressive()
    assert images.jpeg_scans(plain) == 10  # libjpeg's colour progression
    assert images.jpeg_scans(sample_image(64, 48)) == 1  # baseline
    assert images.jpeg_scans(progressive(50)) == 60
    assert images.jpeg_scans(progressive(500)) == images.MAX_JPEG_SCANS + 1  # stops counting past the limit


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # A small image with thousands of scans costs seconds of CPU per decode, each scan re-walking the pixels.
    bomb = progressive(images.MAX_JPEG_SCANS)
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", never)
    monkeypatch.setattr(Image.Image, "load", never)
    assert header_code(bomb) == "too_complex"


def test_a_decoders_refusal_is_final(monkeypatch: pytest.MonkeyPatch) -> None:
    # No second decoder spends the same CPU again on bytes the first refused.
    def refused(data: bytes, **options: object) -> None:
        raise ValueError("libjpeg-turbo: corrupt data")

    jpeg = sample_image(64, 48)
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", refused)
    monkeypatch.setattr(Image.Image, "load", never)
    assert code(jpeg) == "corrupt_image"


def tiff(width: int, height: int, tile: int) -> bytes:
    """A grey TIFF of one ``tile`` x ``tile`` tile; what the tile holds does not matter: it is refused unread."""
    return bad_inputs.tiff(width, height, tile, zlib.compress(bytes(64)))


def test_tiff_tiles_larger_than_the_image_are_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    # libtiff allocates a whole tile: a 32768-pixel-square tile is a gigabyte for a 16x16 image.
    monkeypatch.setattr(Image.Image, "load", never)
    assert header_code(tiff(16, 16, 32768)) == "too_large"
    assert header_code(tiff(20, 20, 48)) == "too_large"  # past the 16-pixel alignment of the edge
    assert images.inspect(tiff(20, 20, 32), LIMITS) == images.ImageInfo(20, 20, "TIFF", "L")


def test_formats_weigh_their_worst_case_bytes_per_pixel() -> None:
    def weight(fmt: str, mode: str) -> float:
        return images.decode_weight(images.ImageInfo(100, 100, fmt, mode))

    assert weight("JPEG", "RGB") == weight("JPEG", "L") == 1.0  # the budget's unit
    assert weight("WEBP", "RGB") == 18.0 / images.BASE_BYTES_PER_PIXEL  # lossless WebP, 18 bytes a pixel
    assert weight("WEBP", "RGBA") == 22.0 / images.BASE_BYTES_PER_PIXEL  # and 22 with alpha
    assert weight("JPEG", "CMYK") == weight("PNG", "RGBA") == 15.0 / images.BASE_BYTES_PER_PIXEL
    assert weight("PNG", "I;16") == 2 * weight("PNG", "RGB")
    assert images.inspect(encoded(6, 4, "WEBP", lossless=True), LIMITS) == images.ImageInfo(6, 4, "WEBP", "RGB")


def test_a_decode_past_its_time_budget_stops_at_its_next_read(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 10_000, 1))  # a second passes at every look at the clock
    monkeypatch.setattr(images.time, "monotonic", lambda: float(next(clock)))
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8))
    out = io.BytesIO()
    noisy.save(out, "PNG", compress_level=0)  # 768 KB: a dozen blocks to read
    limits = images.DecodeLimits(max_bytes=5_000_000, max_pixels=2_000_000, max_seconds=5)
    assert code(out.getvalue(), limits) == "decode_timeout"
    assert images.decode(out.getvalue(), images.DecodeLimits(max_bytes=5_000_000, max_pixels=2_000_000)).shape == (
        512,
        512,
        3,
    )
