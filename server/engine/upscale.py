"""imageUpscale jobs on a super-resolution network loaded through spandrel.

1. the network (``air_registry/super_resolution.py``), cached with the other tool models;
2. the jobs given share a batch key (one input size, one result size), so their images go through the
   network as one batch;
3. a picture larger than the tile size goes through in tiles: each tile is cut with ``OVERLAP`` pixels of
   its neighbours around it and only its own part of the result is kept, so memory stays bounded by the
   tile size and, the overlap being wider than the network's reach, no seam shows;
4. the network enlarges by its own scale (×4 for Real-ESRGAN x4); a different ``upscaleFactor`` is met
   by resizing its result (Lanczos).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from imagewire.air_registry.super_resolution import load_upscaler
from imagewire.server.engine.images import to_image, to_tensor
from imagewire.tasks.image_upscale import UpscaleJob
from imagewire.tasks.jobs import Emit, ProcessedImage

if TYPE_CHECKING:
    from imagewire.server.engine import DiffusersEngine

# Input pixels each tile borrows from its neighbours on every side.
OVERLAP = 16


def run(engine: DiffusersEngine, jobs: Sequence[UpscaleJob], emit: Emit) -> None:
    first = jobs[0]
    tools = engine.tools
    network = tools.get(first.model, first.weights,
                        lambda path: load_upscaler(path, device=tools.device, half=tools.half))
    started = time.perf_counter()
    dtype = tools.dtype if network.supports_half and tools.half else torch.float32
    batch = to_tensor([job.image for job in jobs], device=tools.device, dtype=dtype)
    with torch.inference_mode():
        enlarged = upscale(network, batch, tile_size=first.tile_size, between_tiles=engine.threads.adjust)
    share = (time.perf_counter() - started) / len(jobs)
    for index, job in enumerate(jobs):
        picture = to_image(enlarged[index])
        if picture.size != (job.width, job.height):
            picture = picture.resize((job.width, job.height), Image.Resampling.LANCZOS)
        emit(index, [ProcessedImage(picture, share)])


def upscale(network: Any, batch: torch.Tensor, *, tile_size: int, overlap: int = OVERLAP,
            between_tiles: Callable[[], object] = lambda: None) -> torch.Tensor:
    """``batch`` (N, 3, H, W) enlarged by the network's scale, in tiles of at most ``tile_size`` a side;
    ``between_tiles`` runs after each tile (the CPU thread count is judged again there, as between steps)."""
    count, channels, height, width = batch.shape
    scale = network.scale
    if height <= tile_size and width <= tile_size:
        return _call(network, batch).float().cpu()
    result = torch.empty((count, channels, height * scale, width * scale), dtype=torch.float32)
    for top in range(0, height, tile_size):
        for left in range(0, width, tile_size):
            bottom, right = min(top + tile_size, height), min(left + tile_size, width)
            # The tile with its borrowed border, cut at the picture's edges.
            y0, x0 = max(top - overlap, 0), max(left - overlap, 0)
            y1, x1 = min(bottom + overlap, height), min(right + overlap, width)
            out = _call(network, batch[:, :, y0:y1, x0:x1]).float().cpu()
            result[:, :, top * scale:bottom * scale, left * scale:right * scale] = out[
                :, :, (top - y0) * scale:(bottom - y0) * scale, (left - x0) * scale:(right - x0) * scale]
            between_tiles()
    return result


def _call(network: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The network on ``pixels``, padded to the sizes it accepts (and the padding cut off its result)."""
    requirements = network.size_requirements
    height, width = pixels.shape[-2:]
    padded_height = _fitting(height, requirements.minimum, requirements.multiple_of)
    padded_width = _fitting(width, requirements.minimum, requirements.multiple_of)
    if requirements.square:
        padded_height = padded_width = max(padded_height, padded_width)
    if (padded_height, padded_width) != (height, width):
        mode = "reflect" if padded_height - height < height and padded_width - width < width else "replicate"
        pixels = F.pad(pixels, (0, padded_width - width, 0, padded_height - height), mode=mode)
    out: torch.Tensor = network(pixels)
    return out[:, :, :height * network.scale, :width * network.scale]


def _fitting(size: int, minimum: int, multiple_of: int) -> int:
    size = max(size, minimum)
    return -(-size // multiple_of) * multiple_of
