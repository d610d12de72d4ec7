"""The embedded model ``imagewire:tiny@1`` (builder ``tiny-sd``): a Stable Diffusion pipeline small
enough to run anywhere.

Its weights are random, so its images are noise, but every code path of a real SD 1.x model runs
through it: the CLIP tokenizer and text encoder, a cross-attention UNet, a VAE with the real latent
scale factor of 8, and a standard scheduler. That lets the whole server be exercised on a CPU
without downloading anything.

The model is built from fixed seeds, so every build on a machine with the same library versions
writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Imported from their own modules rather than from ``diffusers``: the package's lazy top level shows
# type checkers placeholder classes without methods.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from transformers import CLIPTextModel

from imagewire.air_registry.tiny.parts import CLIP_WIDTH, clip_text_encoder
from imagewire.air_registry.tiny.tokenizers import (
    build_clip_tokenizer,
    write_clip_vocabulary,
)

# One fixed seed per component: changing one component's shape leaves the others' weights as they were.
_TEXT_ENCODER_SEED = 1
_UNET_SEED = 2
_VAE_SEED = 3

CROSS_ATTENTION_DIM = CLIP_WIDTH  # the UNet attends to the text encoder's states


def _build_text_encoder() -> CLIPTextModel:
    encoder = clip_text_encoder(_TEXT_ENCODER_SEED, with_projection=False)
    assert isinstance(encoder, CLIPTextModel)
    return encoder


def _build_unet() -> UNet2DConditionModel:
    torch.manual_seed(_UNET_SEED)
    return UNet2DConditionModel(
        # 32 latents = 256 pixels: the size the pipeline picks when none is given.
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=2,
        norm_num_groups=8,
    )


def _build_vae(seed: int = _VAE_SEED, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """The tiny VAE; other seeds make VAEs that fit the same latents (``tiny-vae``, the tiny SDXL pair's)."""
    torch.manual_seed(seed)
    # Four blocks, hence three downsamplings: the latent scale factor of 8 that every SD model has,
    # so image sizes behave exactly as with real weights.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=scaling_factor,
    )


def _build_scheduler() -> PNDMScheduler:
    # The noise schedule of Stable Diffusion 1.x, so that scheduler swaps behave as on real models.
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_pipeline() -> StableDiffusionPipeline:
    """The tiny pipeline in memory, float32 on the CPU, with the same weights on every call."""
    # The seeds above must not disturb the random state of whoever builds the model.
    with torch.random.fork_rng(devices=[]):
        # A plain dict: the pipeline's annotations are narrower than what it accepts (None, PNDM).
        components: dict[str, Any] = {
            "vae": _build_vae(),
            "text_encoder": _build_text_encoder(),
            "tokenizer": build_clip_tokenizer(),
            "unet": _build_unet(),
            "scheduler": _build_scheduler(),
            "safety_checker": None,
            "feature_extractor": None,
        }
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def build(directory: Path) -> None:
    """Save the tiny pipeline in diffusers format into ``directory``."""
    build_tiny_pipeline().save_pretrained(directory, safe_serialization=True)
    # Newer tokenizers save only tokenizer.json; the classic files keep the model readable by
    # older library versions and other tools.
    write_clip_vocabulary(directory / "tokenizer")
