"""Crafted hostile inputs for the bad-input scenario, and the liveness probe that watches the worker meet them.

Each file is small and built from its headers: what it would cost to decode
(a gigabyte tile, a thousand scans, a 17-megapixel lossless WebP) is what the
worker must refuse before paying it. ``HealthProbe`` asks ``/healthz`` from a
thread of its own, so what it measures is the worker's event loop, not the
harness's.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from functools import cache

from PIL import Image

from devstack.samples import sample_image

#: Seconds between two ``/healthz`` requests; each waits at most ``PROBE_TIMEOUT_S``.
PROBE_INTERVAL_S = 0.1
PROBE_TIMEOUT_S = 5.0


def tiff(width: int, height: int, tile: int, pixels: bytes) -> bytes:
    """A deflate-compressed grey TIFF of one ``tile``-pixel square tile holding ``pixels``, built tag by tag."""
    entries = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 8),  # deflate
        (262, 3, 1),  # black is zero
        (277, 3, 1),
        (322, 4, tile),
        (323, 4, tile),
        (324, 4, 8 + 2 + 12 * 10 + 4),  # the tile's data follows the directory
        (325, 4, len(pixels)),
    ]
    directory = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
        directory += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + directory + struct.pack("<I", 0) + pixels


@cache
def tiff_tile_bomb(side: int = 100, tile: int = 32768) -> bytes:
    """A TIFF of a ``side``-pixel square image in one ``tile``-pixel square tile (libtiff allocates a whole tile)."""
    return tiff(side, side, tile, zlib.compress(bytes(1 << 20), 9))


@cache
def scan_bomb(extra_scans: int = 500) -> bytes:
    """A 256x256 progressive JPEG whose last scan is repeated ``extra_scans`` times."""
    out = io.BytesIO()
    Image.open(io.BytesIO(sample_image(256, 256))).save(out, "JPEG", progressive=True)
    data = out.getvalue()
    last, end = data.rindex(b"\xff\xda"), len(data) - 2
    return data[:end] + data[last:end] * extra_scans + data[end:]


@cache
def webp_bomb(side: int = 4200) -> bytes:
    """A lossless WebP of one colour: a few KB that decode to ``side`` squared pixels at 18 bytes each."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), (40, 90, 160)).save(out, "WEBP", lossless=True)
    return out.getvalue()


class HealthProbe:
    """Asks ``url`` every ``PROBE_INTERVAL_S`` from its own thread; keeps every answer's latency (a failure counts
    as ``PROBE_TIMEOUT_S``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies_s: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthz-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=PROBE_TIMEOUT_S) as response:
                    response.read()
                    ok = response.status == 200
            except (OSError, urllib.error.URLError):
                ok = False
            elapsed = time.monotonic() - started
            if not ok:
                self.failures += 1
                elapsed = max(elapsed, PROBE_TIMEOUT_S)
            self.latencies_s.append(elapsed)
            self._stop.wait(PROBE_INTERVAL_S)

    def summary(self) -> dict[str, float | int]:
        ordered = sorted(self.latencies_s) or [0.0]
        return {
            "healthz_probes": len(self.latencies_s),
            "healthz_failures": self.failures,
            "healthz_max_s": round(ordered[-1], 3),
            "healthz_p99_s": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
            "healthz_over_1s": sum(1 for s in self.latencies_s if s > 1.0),
        }


@cache
def huge_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 30000x30000 1-bit PNG (about 100 KB, 900 megapixels): a decompression bomb."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_chunk = 1000
    chunks = [compressor.compress(row * rows_per_chunk) for _ in range(height // rows_per_chunk)]
    chunks.append(compressor.compress(row * (height % rows_per_chunk)))
    chunks.append(compressor.flush())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(chunks)) + chunk(b"IEND", b"")
