"""The sweep's plot, drawn with Pillow (no plotting library needed): throughput and p99 latency
against the worker's in-flight limit, two panels sharing the x axis, returned as PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 900, 640
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 90, 30, 50, 60
PANEL_GAP = 60
GRID_LINES = 4
COLORS = ("#1f77b4", "#d62728")


def _nice_max(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above ``value``: an axis top."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value)


def render(limits: Sequence[int], throughput: Sequence[float], p99_ms: Sequence[float], title: str) -> bytes:
    """A PNG: ``throughput`` (jobs/s) and ``p99_ms`` against ``limits`` (equally spaced categories)."""
    if not (len(limits) == len(throughput) == len(p99_ms)) or not limits:
        raise ValueError("one throughput and one p99 per in-flight limit")
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    draw.text((MARGIN_LEFT, 15), title, fill="black", font=font)
    panel_h = (HEIGHT - MARGIN_TOP - MARGIN_BOTTOM - PANEL_GAP) // 2
    left, right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    step = (right - left) / len(limits)
    xs = [left + step * (i + 0.5) for i in range(len(limits))]
    panels = (
        (MARGIN_TOP, throughput, "throughput (jobs/s)", COLORS[0]),
        (MARGIN_TOP + panel_h + PANEL_GAP, p99_ms, "p99 latency, pull to ack (ms)", COLORS[1]),
    )
    for top, values, label, color in panels:
        bottom = top + panel_h
        y_max = _nice_max(max(values) * 1.1)
        for g in range(GRID_LINES + 1):
            y = bottom - panel_h * g / GRID_LINES
            draw.line([(left, y), (right, y)], fill="#e0e0e0")
            text = f"{y_max * g / GRID_LINES:g}"
            draw.text((left - 8, y), text, fill="black", font=small, anchor="rm")
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left + 8, top + 6), label, fill=color, font=font)
        points = [(x, bottom - panel_h * v / y_max) for x, v in zip(xs, values, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=color, width=3)
        for (x, y), value in zip(points, values, strict=True):
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=color)
            draw.text((x, y - 10), f"{value:,.0f}", fill="black", font=small, anchor="mb")
        for x, limit in zip(xs, limits, strict=True):
            draw.text((x, bottom + 8), str(limit), fill="black", font=small, anchor="mt")
    draw.text(((left + right) / 2, HEIGHT - 20), "worker in-flight limit (TRITONQ_MAX_IN_FLIGHT)", fill="black",
              font=font, anchor="mm")  # fmt: skip
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def sweep_png(sweep: Sequence[Mapping[str, Any]], title: str) -> bytes | None:
    """The plot of the sweep's points (``bench.json``'s ``sweep``); ``None`` without any."""
    if not sweep:
        return None
    return render(
        [p["max_in_flight"] for p in sweep],
        [p["jobs_per_s"] for p in sweep],
        [(p.get("service_ms") or {}).get("p99", 0.0) for p in sweep],
        title,
    )
