"""Getting images in and out: imageUpload throughput over the socket, and each output encoding's cost."""

from __future__ import annotations

import time
import uuid
from typing import Any

from bench.context import BenchContext, progress
from bench.images import data_uri, encoded, test_picture
from bench.stats import milliseconds, summarize

UPLOAD_FORMATS = ("PNG", "JPEG")
# (label, storage.encode format, quality): the API's default quality is 95.
OUTPUT_ENCODINGS = (("JPG q95", "JPG", 95), ("PNG", "PNG", 95), ("WEBP q95", "WEBP", 95))


async def upload_section(ctx: BenchContext, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """Sequential imageUpload tasks with a data URI; MB/s counts the image bytes, not their base64."""
    rows: list[dict[str, Any]] = []
    connection = await ctx.connect()
    try:
        for size in sizes:
            picture = test_picture(size)
            for image_format in UPLOAD_FORMATS:
                data = encoded(picture, image_format)
                uri = data_uri(data, image_format)
                await connection.run(_upload_task(uri))  # warm-up
                latencies: list[float] = []
                started = time.perf_counter()
                for _ in range(ctx.budget.uploads):
                    latency, _ = await connection.run(_upload_task(uri))
                    latencies.append(latency)
                wall = time.perf_counter() - started
                latency_ms = summarize(milliseconds(latencies))
                rows.append({
                    "format": image_format,
                    "size": size,
                    "image_bytes": len(data),
                    "frame_bytes": len(uri) + 80,
                    "latency_ms": latency_ms,
                    "uploads_per_s": round(len(latencies) / wall, 2),
                    "mb_per_s": round(len(data) * len(latencies) / wall / 1e6, 2),
                })
            progress(f"uploads {size}²: done")
    finally:
        await connection.close()
    return rows


def _upload_task(uri: str) -> dict[str, Any]:
    return {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": uri}


def encoding_section(sizes: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    """``storage.encode`` in this process, one call at a time: the CPU cost of each output encoding."""
    from imagewire.storage import encode_image, output_format, to_base64

    rows: list[dict[str, Any]] = []
    for size in sizes:
        picture = test_picture(size)
        for label, format_name, quality in OUTPUT_ENCODINGS:
            chosen = output_format(format_name)
            assert chosen is not None
            data = encode_image(picture, chosen, quality)  # warm-up
            encode_s, base64_s = [], []
            for _ in range(repeats):
                started = time.perf_counter()
                data = encode_image(picture, chosen, quality)
                encode_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                to_base64(data)
                base64_s.append(time.perf_counter() - started)
            rows.append({
                "encoding": label,
                "size": size,
                "bytes": len(data),
                "encode_ms": summarize(milliseconds(encode_s)),
                "base64_ms": summarize(milliseconds(base64_s)),
            })
    progress("encoding: done")
    return rows
