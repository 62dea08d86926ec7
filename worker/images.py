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
all limited, and anything that cannot be read is a ``PermanentJobError``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}


@dataclass(frozen=True)
class DecodeLimits:
    """What an input image may be: at most ``max_bytes`` encoded and ``max_pixels`` decoded."""

    max_bytes: int
    max_pixels: int
    formats: frozenset[str] = ALLOWED_FORMATS


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
            try:
                array: NDArray[Any] = simplejpeg.decode_jpeg(data, colorspace="RGB")
                return array
            except ValueError:
                # Strict libjpeg-turbo refuses what libjpeg only warns about (stray bytes between
                # markers, say): Pillow, which tolerates that much, has the last word.
                pass
        return np.asarray(_load_rgb(opened, draft_size))


def probe(data: bytes, limits: DecodeLimits) -> tuple[int, int]:
    """Check an encoded image against the limits from its header alone; returns (width, height)."""
    with _as_job_errors("header could not be read"), _open(data, limits) as opened:
        width, height = opened.size
        return width, height


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


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Open (header only) an image within the byte, format and pixel limits."""
    if not data:
        raise PermanentJobError("not_an_image", "input is empty")
    if len(data) > limits.max_bytes:
        raise PermanentJobError("too_large", f"input is {len(data)} bytes, limit {limits.max_bytes}")
    opened = Image.open(io.BytesIO(data), formats=sorted(limits.formats))
    width, height = opened.size
    if width * height > limits.max_pixels:
        opened.close()
        raise PermanentJobError("too_large", f"image is {width}x{height} pixels, limit {limits.max_pixels} pixels")
    return opened


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
