"""The embedded model ``imagewire:tiny-inpaint@1`` (builder ``tiny-sd-inpaint``): an inpainting checkpoint.

The tiny model's text encoder, tokenizer, VAE and scheduler with a UNet of 9 input channels, the layout
of every SD inpainting checkpoint: 4 of noisy latents, 1 of the mask and 4 of the masked image's latents.
Its weights are random; the inpainting pipeline's code path is the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import StableDiffusionInpaintPipeline

from imagewire.air_registry.tiny.sd import build_tiny_pipeline
from imagewire.air_registry.tiny.tokenizers import write_clip_vocabulary

_UNET_SEED = 4
# Noisy latents, the mask, the masked image's latents.
INPAINT_CHANNELS = 4 + 1 + 4


def _build_unet(like: UNet2DConditionModel) -> UNet2DConditionModel:
    config: dict[str, Any] = {**like.config, "in_channels": INPAINT_CHANNELS}
    torch.manual_seed(_UNET_SEED)
    return UNet2DConditionModel.from_config(config)


def build_tiny_inpaint_pipeline() -> StableDiffusionInpaintPipeline:
    base = build_tiny_pipeline()
    with torch.random.fork_rng(devices=[]):
        unet = _build_unet(base.unet)
    components: dict[str, Any] = {**base.components, "unet": unet}
    return StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)


def build(directory: Path) -> None:
    build_tiny_inpaint_pipeline().save_pretrained(directory, safe_serialization=True)
    write_clip_vocabulary(directory / "tokenizer")
