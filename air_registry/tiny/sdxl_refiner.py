"""The embedded SDXL refiner ``imagewire:tiny-sdxl-refiner@1`` (builder ``tiny-sdxl-refiner``), shaped
like SDXL's refiner: it finishes what ``tiny-sdxl`` starts, from the same latents.

As in the real refiner it has only the second text encoder (the same one as the base, as SDXL's refiner
shares OpenCLIP-G), a UNet of its own conditioned on an aesthetic score instead of the target size
(``requires_aesthetics_score``), and the base's VAE. It only does image-to-image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)

from imagewire.air_registry.tiny.sdxl import (
    TEXT_WIDTH,
    build_scheduler,
    build_text_encoder_2,
    build_unet,
    build_vae,
    save,
)
from imagewire.air_registry.tiny.tokenizers import build_clip_tokenizer

_UNET_SEED = 51


def build_tiny_refiner_pipeline() -> StableDiffusionXLImg2ImgPipeline:
    with torch.random.fork_rng(devices=[]):
        components: dict[str, Any] = {
            "vae": build_vae(),
            "text_encoder": None,
            "tokenizer": None,
            "text_encoder_2": build_text_encoder_2(),
            "tokenizer_2": build_clip_tokenizer(),
            # Five time ids: the original size, the crop's corner and the aesthetic score.
            "unet": build_unet(seed=_UNET_SEED, cross_attention_dim=TEXT_WIDTH, time_ids=5),
            "scheduler": build_scheduler(),
        }
    return StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=True,
                                            force_zeros_for_empty_prompt=False)


def build(directory: Path) -> None:
    save(build_tiny_refiner_pipeline(), directory)
