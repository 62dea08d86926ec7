"""Sample images: deterministic, photo-like inputs for the demo, the tests, the benchmark and the fault scenarios."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def sample_image(width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A deterministic photo-like test image: smooth gradients, a few shapes, sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / (width / 3.1) + seed),
            128 + 100 * np.cos(y / (height / 2.3)),
            128 + 80 * np.sin((x + y) / (width / 1.7)),
        ],
        axis=-1,
    )
    for _ in range(4):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.05, 0.2) * min(width, height)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
        base[mask] = rng.uniform(0, 255, size=3)
    base += rng.normal(0, 6, size=base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()
