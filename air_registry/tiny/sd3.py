"""The embedded model ``imagewire:tiny-sd3@1`` (builder ``tiny-sd3``): a Stable Diffusion 3.5 pipeline
small enough to run anywhere.

Its weights are random, so its images are noise, but every component of SD 3.5 medium is there: two
CLIP text encoders with projections (their pooled outputs condition the transformer alongside T5's
sequence) and a T5 encoder, each with its own tokenizer; the MMDiT transformer in 2×2 patches with
RMS-normalised queries and keys and a dual-attention block (MMDiT-X); the 16-channel VAE with SD 3's
scale and shift; and the shifted flow-matching sampler. Built from fixed seeds, with no download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

from imagewire.air_registry.tiny.parts import CLIP_WIDTH, clip_text_encoder, latent16_vae, t5_encoder
from imagewire.air_registry.tiny.tokenizers import build_clip_tokenizer, build_t5_tokenizer, write_clip_vocabulary

# One fixed seed per component: changing one component's shape leaves the others' weights as they were.
_CLIP_SEED = 21
_CLIP_2_SEED = 22
_T5_SEED = 23
_TRANSFORMER_SEED = 24
_VAE_SEED = 25

# SD 3 places both CLIP sequences side by side and pads them to T5's width: it must hold both.
T5_WIDTH = 2 * CLIP_WIDTH


def _build_transformer() -> SD3Transformer2DModel:
    torch.manual_seed(_TRANSFORMER_SEED)
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        # Both CLIP encoders' pooled projections, side by side.
        pooled_projection_dim=2 * CLIP_WIDTH,
        # Positions for up to 128 patches a side: 2048 pixels, the largest size a request may ask for.
        pos_embed_max_size=128,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )


def build_tiny_pipeline() -> StableDiffusion3Pipeline:
    """The tiny SD 3.5 pipeline in memory, float32 on the CPU, with the same weights on every call."""
    with torch.random.fork_rng(devices=[]):
        components: dict[str, Any] = {
            "text_encoder": clip_text_encoder(_CLIP_SEED, with_projection=True),
            "tokenizer": build_clip_tokenizer(),
            "text_encoder_2": clip_text_encoder(_CLIP_2_SEED, with_projection=True),
            "tokenizer_2": build_clip_tokenizer(),
            "text_encoder_3": t5_encoder(_T5_SEED, width=T5_WIDTH),
            "tokenizer_3": build_t5_tokenizer(),
            "transformer": _build_transformer(),
            "vae": latent16_vae(_VAE_SEED, scaling_factor=1.5305, shift_factor=0.0609),
            # SD 3's own: a fixed shift of the sigmas towards noise.
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        }
    return StableDiffusion3Pipeline(**components)


def build(directory: Path) -> None:
    """Save the tiny SD 3.5 pipeline in diffusers format into ``directory``."""
    build_tiny_pipeline().save_pretrained(directory, safe_serialization=True)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        write_clip_vocabulary(directory / tokenizer)
