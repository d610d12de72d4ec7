"""Compiled denoisers, opt-in: ``--compile``, or a catalog entry's ``"compile": true`` (``false`` keeps one eager).

Only the denoiser's repeated blocks are compiled (regional compilation): a UNet's transformer blocks, a FLUX.1
transformer's double- and single-stream blocks, an SD 3 transformer's joint blocks. Every block of one class
and width runs the same graph, so a model compiles a handful of graphs, in seconds on a GPU rather than the
minutes a whole-model compile takes, and the rest of the pipeline (text encoders, VAE, the sampler's
arithmetic) stays as it was.

Graphs are compiled with dynamic shapes from the first call, so one graph serves every image size and batch.
Dynamo still makes a graph of its own for a batch of one (it always specializes sizes 0 and 1), and whether
classifier-free guidance doubles the batch decides which of the two a call meets. So when a compiled model
loads, ``warm_up`` runs the calls service makes, two steps each, with the latents kept (no VAE decode): one
image with guidance and without, two images, and a second size; after it, a mix of sizes, batches and
guidance compiles nothing new (``tests/air_registry/test_compile.py`` counts the graphs). A LoRA or IP-Adapter
changes the blocks' layers, so a request with one compiles again (and Dynamo falls back to running eagerly
once a block has been recompiled ``torch._dynamo.config.recompile_limit`` times).

Whether compiling pays depends on the device: compilation is one of the steps in published GPU speed-ups of
FLUX.1 and SDXL; on a CPU the first call waits a minute or more for the compiler and the blocks gain about 5 %
(BENCHMARKS.md, "Compiled denoisers"), which is why nothing is compiled unless asked for.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import torch
from PIL import Image

logger = logging.getLogger(__name__)

# Where a denoiser keeps its repeated blocks, for the models that do not list their classes in diffusers'
# ``_repeated_blocks`` (SD 3's transformer lists none).
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def denoiser_of(pipe: Any) -> Any:
    """The pipeline's UNet or transformer."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is None:
        raise ValueError(f"{type(pipe).__name__} has neither a transformer nor a UNet to compile")
    return denoiser


def repeated_block_classes(denoiser: Any) -> tuple[str, ...]:
    """The class names of the blocks compiled: the model's own list, else those of its block lists."""
    named = tuple(getattr(denoiser, "_repeated_blocks", None) or ())
    if named:
        return named
    found: list[str] = []
    for attribute in _BLOCK_LISTS:
        for block in getattr(denoiser, attribute, None) or ():
            if type(block).__name__ not in found:
                found.append(type(block).__name__)
    return tuple(found)


def repeated_blocks(pipe: Any) -> list[Any]:
    """The modules of the pipeline's denoiser that are compiled: every block of its repeated classes."""
    denoiser = denoiser_of(pipe)
    classes = repeated_block_classes(denoiser)
    return [module for module in denoiser.modules() if type(module).__name__ in classes]


def compile_denoiser(pipe: Any) -> int:
    """Compile each repeated block of the pipeline's denoiser in place, with dynamic shapes; the number of
    blocks set to compile. The pipelines made from this one for image-to-image or inpainting share the
    blocks, and so their graphs."""
    blocks = repeated_blocks(pipe)
    if not blocks:
        raise ValueError(f"{type(denoiser_of(pipe)).__name__} has no repeated blocks to compile")
    for block in blocks:
        block.compile(fullgraph=True, dynamic=True)
    return len(blocks)


def uncompile_denoiser(pipe: Any) -> None:
    """Run the denoiser's blocks eagerly again (after a compile that failed)."""
    for block in repeated_blocks(pipe):
        block._compiled_call_impl = None


def _other_size(side: int) -> int:
    """A second side length for the warm-up, a multiple of 64 as every model's sizes are."""
    return side + 64 if side < 256 else side // 128 * 64


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process so far (a recompilation is one more)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warm_up(pipe: Any, *, width: int, height: int, max_batch_size: int, device: str) -> int:
    """Run the calls service will make, so that their graphs are compiled before a client waits on them; the
    number of graphs compiled. ``width``/``height``: the model's usual size; a second, oblong one is run too,
    since Dynamo makes a graph for square latents of its own. An image-to-image or inpainting view is warmed up
    by passing it: its latents come from the VAE's encoder, laid out in memory otherwise."""
    parameters = inspect.signature(pipe.__call__).parameters
    # An inpainting pipeline needs its image and mask, an image-to-image one its image; others start from noise.
    needs_mask, needs_image = "mask_image" in parameters, "strength" in parameters or "mask_image" in parameters
    oblong = (_other_size(width), height)
    calls = [((width, height), 1, 7.0), ((width, height), 1, 1.0), ((width, height), min(2, max_batch_size), 7.0),
             (oblong, 1, 7.0), (oblong, min(2, max_batch_size), 1.0)]
    before, started = graphs_compiled(), time.monotonic()
    for (call_width, call_height), batch, guidance in calls:
        arguments: dict[str, Any] = {
            "prompt": ["warm-up"] * batch, "num_inference_steps": 2, "width": call_width, "height": call_height,
            "guidance_scale": guidance, "output_type": "latent",
        }
        if needs_image:
            arguments["image"] = [Image.new("RGB", (call_width, call_height), (128, 128, 128))] * batch
            arguments["strength"] = 1.0 if needs_mask else 0.6
        if needs_mask:
            arguments["mask_image"] = [Image.new("L", (call_width, call_height), 255)] * batch
        # As the engine calls pipelines: tensors made under inference mode are guarded on as such.
        with torch.inference_mode():
            pipe(**arguments)
    compiled = graphs_compiled() - before
    logger.info("compiled %d graphs of %s's repeated blocks for %s in %.1f s on %s", compiled,
                type(denoiser_of(pipe)).__name__, type(pipe).__name__, time.monotonic() - started, device)
    return compiled
