"""Pure image work: decode with limits, orient, resize, lay out tensors, encode.

Bytes in, arrays out, and back; no I/O and no event loop, so the pipeline may
run these functions anywhere: small images on its event loop, large ones in its
thread pool. JPEG, the common case both ways, goes straight between bytes and
numpy through libjpeg-turbo (``simplejpeg``): measured on the benchmark's
images, a 1024 px decode costs 5.3 ms against Pillow's 7.6 (Pillow decodes into
its own 4-byte pixels, then packs a copy for numpy; the pixels come out
identical), an encode 4.2 against 6.0 ms, and both release the GIL (two threads
encode 2.2x as fast as one; Pillow's in-memory encode holds it). Pillow reads
every header and decodes and encodes everything else.
Decoding is the security boundary for untrusted input: the byte size, the pixel
count (checked from the header, before any pixel is decoded) and the format are
all limited, and anything that cannot be read is a ``PermanentJobError``. What
a small file can still cost is bounded before decoding too: a progressive JPEG
with more scans than a real one has, and a TIFF whose tiles are larger than its
image (libtiff allocates a whole tile), are refused; ``decode_weight`` says how
many bytes per pixel a format and mode may take at the peak of a decode, for
the pipeline's memory budget; a decode that overruns ``max_seconds`` stops at
its next read. The first decoder's refusal is final: no second decoder spends
CPU on bytes one has refused.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import simplejpeg
from numpy.typing import NDArray
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from worker.errors import PermanentJobError

#: Formats accepted as input; everything else (PSD, EPS, ICO, ...) is refused
#: before Pillow's more exotic and less hardened decoders see the bytes.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"})

#: Output encoders and their settings, chosen by measurement (see README,
#: Performance): PNG at compress_level 1 costs a fraction of the default 6 for
#: ~10% larger files; WebP method 2 is the knee of its speed/size curve. JPEG
#: (libjpeg-turbo, 4:2:0, as Pillow's default) gives files of the same size and
#: quality as Pillow's at the same setting.
ENCODERS: dict[str, tuple[str, dict[str, object]]] = {
    "jpeg": ("JPEG", {"quality": 90, "colorsubsampling": "420"}),
    "png": ("PNG", {"compress_level": 1}),
    "webp": ("WEBP", {"quality": 85, "method": 2}),
}
#: Seconds one image decode may take: past it the job fails (``decode_timeout``) instead of holding a thread.
MAX_DECODE_S = 20.0
#: Scans a progressive JPEG may have. libjpeg's own progressions use 10 (colour) or 6 (grey); each
#: scan re-walks every coefficient, so a file of thousands of tiny scans costs CPU out of all proportion.
MAX_JPEG_SCANS = 100
#: TIFF tiles are multiples of 16 px on a side, so a tile may pass the image's edge by this much.
TIFF_TILE_ALIGN = 16
#: Worker memory per decoded pixel the pixel budget is calibrated on (a plain JPEG into RGB).
BASE_BYTES_PER_PIXEL = 4.5
#: Peak bytes per pixel of a decode, by format (README, Security): Pillow's 4-byte pixels, its RGB
#: conversion, and the numpy copy; lossless WebP goes through libwebp's own buffers on top.
DECODE_BYTES_PER_PIXEL = {"JPEG": 11.0, "PNG": 11.0, "GIF": 11.0, "BMP": 11.0, "TIFF": 11.0, "WEBP": 18.0}
#: Modes with a fourth channel (alpha, or CMYK's black) cost one more 4-byte copy on the way to RGB.
FOUR_CHANNEL_MODES = frozenset({"RGBA", "RGBa", "RGBX", "CMYK", "LA", "La", "PA"})
#: Modes of more than 8 bits a channel hold up to twice as many bytes before conversion.
WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
#: A JPEG marker after entropy-coded data: 0xFF, then anything but a stuffed zero, a restart marker or fill.
_JPEG_MARKER = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")
_TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 322, 323
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}


@dataclass(frozen=True)
class DecodeLimits:
    """What an input image may be: at most ``max_bytes`` encoded and ``max_pixels`` decoded, in ``max_seconds``."""

    max_bytes: int
    max_pixels: int
    formats: frozenset[str] = ALLOWED_FORMATS
    max_seconds: float = math.inf


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says: enough to weigh the job before decoding it."""

    width: int
    height: int
    format: str
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def decode_weight(info: ImageInfo) -> float:
    """How many budget pixels one pixel of this image weighs while it decodes (1 for a plain JPEG)."""
    if info.format == "JPEG" and info.mode in ("RGB", "L"):
        return 1.0  # libjpeg-turbo writes RGB straight into the array
    per_pixel = DECODE_BYTES_PER_PIXEL.get(info.format, max(DECODE_BYTES_PER_PIXEL.values()))
    if info.mode in FOUR_CHANNEL_MODES:
        per_pixel += 4
    if info.mode in WIDE_MODES:
        per_pixel *= 2
    return per_pixel / BASE_BYTES_PER_PIXEL


def configure_pillow(max_pixels: int) -> None:
    """Set Pillow's own decompression-bomb guard to our limit (it errors at twice that)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode(data: bytes, limits: DecodeLimits, draft_size: tuple[int, int] | None = None) -> NDArray[Any]:
    """Decode an encoded image into an RGB ``uint8`` array of shape ``[H, W, 3]``.

    EXIF orientation is applied. ``draft_size`` lets the JPEG decoder scale down
    by a power of two while decoding, when the model needs a smaller image anyway.
    """
    with _as_job_errors("could not be decoded"):
        opened = _open(data, limits)
        if draft_size is None and _plain_jpeg(opened, data):
            # Its refusal is final: a second decoder would spend as much CPU again on the same bytes.
            array: NDArray[Any] = simplejpeg.decode_jpeg(data, colorspace="RGB")
            return array
        return np.asarray(_load_rgb(opened, draft_size))


def probe(data: bytes, limits: DecodeLimits) -> tuple[int, int]:
    """Check an encoded image against the limits from its header alone; returns (width, height)."""
    info = inspect(data, limits)
    return info.width, info.height


def inspect(data: bytes, limits: DecodeLimits) -> ImageInfo:
    """Check an encoded image against the limits from its headers alone; returns what they say."""
    with _as_job_errors("header could not be read"), _open(data, limits) as opened:
        width, height = opened.size
        return ImageInfo(width, height, opened.format or "", opened.mode)


def jpeg_scans(data: bytes, stop_after: int = MAX_JPEG_SCANS) -> int:
    """Scans (SOS markers) in a JPEG, counted by walking its marker segments; stops past ``stop_after``."""
    scans, position = 0, 2  # after SOI
    while position + 4 <= len(data) and scans <= stop_after:
        if data[position] != 0xFF:
            return scans  # not a marker where one must be: the decoder will say what is wrong
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xD9:  # EOI
            return scans
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            scans += 1
            found = _JPEG_MARKER.search(data, position)
            if found is None:
                return scans
            position = found.end() - 2
    return scans


def _plain_jpeg(opened: Image.Image, data: bytes) -> bool:
    """A JPEG libjpeg-turbo turns into upright RGB as Pillow would: YCbCr or grey, no EXIF turn.

    CMYK and YCCK (Adobe's inverted inks) and turned images go through Pillow. So does a file whose
    size libjpeg-turbo reads otherwise than Pillow did: the pixel limit was checked on Pillow's reading.
    """
    if opened.format != "JPEG" or opened.mode not in ("RGB", "L"):
        return False
    orientation: int = opened.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation != 1:
        return False
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return False
    return (width, height) == opened.size


def _load_rgb(opened: Image.Image, draft_size: tuple[int, int] | None) -> Image.Image:
    if draft_size is not None and opened.format == "JPEG":
        opened.draft("RGB", draft_size)
    opened.load()
    # In place: without it, exif_transpose copies every image that needs no turning (the usual case),
    # 2 ms of a 1024 px decode's 10.
    ImageOps.exif_transpose(opened, in_place=True)
    return opened if opened.mode == "RGB" else opened.convert("RGB")


class _DeadlineReader(io.BytesIO):
    """The encoded bytes as Pillow reads them, block by block: a decode past its deadline stops at its next read."""

    def __init__(self, data: bytes, seconds: float) -> None:
        super().__init__(data)
        self._deadline = time.monotonic() + seconds

    def read(self, size: int | None = -1, /) -> bytes:
        if time.monotonic() > self._deadline:
            raise PermanentJobError("decode_timeout", "decoding the image took longer than its time budget")
        return super().read(size)


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Open (header only) an image within the byte, format, pixel, scan and tile limits."""
    if not data:
        raise PermanentJobError("not_an_image", "input is empty")
    if len(data) > limits.max_bytes:
        raise PermanentJobError("too_large", f"input is {len(data)} bytes, limit {limits.max_bytes}")
    source: BinaryIO = (
        _DeadlineReader(data, limits.max_seconds) if math.isfinite(limits.max_seconds) else io.BytesIO(data)
    )
    opened = Image.open(source, formats=sorted(limits.formats))
    try:
        _check_costs(opened, data, limits)
    except PermanentJobError:
        opened.close()
        raise
    return opened


def _check_costs(opened: Image.Image, data: bytes, limits: DecodeLimits) -> None:
    """Refuse what the header shows to cost more than its pixels: too many pixels, scans, or too large tiles."""
    width, height = opened.size
    if width * height > limits.max_pixels:
        raise PermanentJobError("too_large", f"image is {width}x{height} pixels, limit {limits.max_pixels} pixels")
    if opened.format == "JPEG" and (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
        raise PermanentJobError("too_complex", f"JPEG has over {scans - 1} scans, limit {MAX_JPEG_SCANS}")
    if opened.format == "TIFF":
        tags = getattr(opened, "tag_v2", {})
        tile = (int(tags.get(_TIFF_TILE_WIDTH, 0)), int(tags.get(_TIFF_TILE_LENGTH, 0)))
        edge = (-(-width // TIFF_TILE_ALIGN) * TIFF_TILE_ALIGN, -(-height // TIFF_TILE_ALIGN) * TIFF_TILE_ALIGN)
        if tile[0] > edge[0] or tile[1] > edge[1]:
            raise PermanentJobError(
                "too_large", f"TIFF tiles of {tile[0]}x{tile[1]} are larger than its {width}x{height} image"
            )


@contextlib.contextmanager
def _as_job_errors(failure: str) -> Iterator[None]:
    """Whatever Pillow raises about the input is the job's fault: a ``PermanentJobError`` with its code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except PermanentJobError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PermanentJobError("too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise PermanentJobError("not_an_image", "input is not an image in an allowed format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated and corrupt files as OSError (and a few as SyntaxError).
        raise PermanentJobError("corrupt_image", f"image {failure}: {exc}") from exc


def to_chw_float(image: NDArray[Any], size: tuple[int, int]) -> NDArray[Any]:
    """Resize an ``[H, W, 3]`` uint8 image to ``size`` (W, H) and lay it out as FP32 ``[3, H, W]`` in [0, 1]."""
    if (image.shape[1], image.shape[0]) != size:
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) * np.float32(1.0 / 255.0)


def bucket_size(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``size``; past the largest, the next multiple of it."""
    for bucket in buckets:
        if size <= bucket:
            return bucket
    largest = buckets[-1]
    return -(-size // largest) * largest


def pad_to_bucket(image: NDArray[Any], buckets: tuple[int, ...]) -> NDArray[Any]:
    """Pad an ``[H, W, C]`` image at the bottom and right, repeating its edge, to a bucket shape.

    Triton batches only requests of one shape: a few bucket shapes let images
    of many sizes share batches. Repeating the edge (rather than black) keeps
    border statistics, which models such as background removal read, intact.
    """
    height, width = image.shape[:2]
    target = (bucket_size(height, buckets), bucket_size(width, buckets))
    if target == (height, width):
        return image
    return np.pad(image, ((0, target[0] - height), (0, target[1] - width), (0, 0)), mode="edge")


def crop_output(output: NDArray[Any], original: tuple[int, int], padded: tuple[int, int]) -> NDArray[Any]:
    """Crop a model's output for a padded input back to the original's extent (any scale factor).

    ``original`` and ``padded`` are (height, width) of the input before and after padding.
    """
    if original == padded:
        return output
    scale_y = output.shape[0] / padded[0]
    scale_x = output.shape[1] / padded[1]
    return output[: round(original[0] * scale_y), : round(original[1] * scale_x)]


def encode(array: NDArray[Any], fmt: str) -> bytes:
    """Encode an ``[H, W, 3|4]`` uint8 array; RGBA needs a format with alpha (png, webp)."""
    if fmt not in ENCODERS:
        raise PermanentJobError("invalid_format", f"cannot encode images as {fmt!r}")
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3|4] uint8 array, got {array.shape} {array.dtype}")
    pil_format, options = ENCODERS[fmt]
    if pil_format == "JPEG":
        if array.shape[2] == 4:
            raise PermanentJobError("invalid_format", "jpeg cannot carry the alpha channel; use png or webp")
        encoded: bytes = simplejpeg.encode_jpeg(array, colorspace="RGB", **options)
        return encoded
    image = Image.fromarray(array, "RGBA" if array.shape[2] == 4 else "RGB")
    out = io.BytesIO()
    image.save(out, pil_format, **options)
    return out.getvalue()
