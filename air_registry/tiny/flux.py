"""The embedded model ``imagewire:tiny-flux@1`` (builder ``tiny-flux``): a FLUX.1 [dev] pipeline small
enough to run anywhere.

Its weights are random, so its images are noise, but every component of FLUX.1 is there: the CLIP
text encoder (its pooled output) and the T5 encoder (its sequence), each with its own tokenizer; the
MMDiT transformer with double- and single-stream blocks, rotary position axes and the guidance
embedding of [dev]; the 16-channel VAE with FLUX's scale and shift; and the flow-matching sampler
with FLUX's dynamic shifting. Built from fixed seeds, with no download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

from imagewire.air_registry.tiny.parts import CLIP_WIDTH, clip_text_encoder, latent16_vae, t5_encoder
from imagewire.air_registry.tiny.tokenizers import build_clip_tokenizer, build_t5_tokenizer, write_clip_vocabulary

# One fixed seed per component: changing one component's shape leaves the others' weights as they were.
_CLIP_SEED = 11
_T5_SEED = 12
_TRANSFORMER_SEED = 13
_VAE_SEED = 14

T5_WIDTH = 32


def _build_transformer() -> FluxTransformer2DModel:
    torch.manual_seed(_TRANSFORMER_SEED)
    return FluxTransformer2DModel(
        patch_size=1,
        # 16 latent channels, packed in 2×2 patches.
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=True,
        # Rotary axes (text position, row, column); they share the attention head's width.
        axes_dims_rope=(4, 6, 6),
    )


def _build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.1's own: the sigma shift grows with the image's token count.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)


def build_tiny_pipeline() -> FluxPipeline:
    """The tiny FLUX pipeline in memory, float32 on the CPU, with the same weights on every call."""
    with torch.random.fork_rng(devices=[]):
        components: dict[str, Any] = {
            "text_encoder": clip_text_encoder(_CLIP_SEED, with_projection=False),
            "tokenizer": build_clip_tokenizer(),
            "text_encoder_2": t5_encoder(_T5_SEED, width=T5_WIDTH),
            "tokenizer_2": build_t5_tokenizer(),
            "transformer": _build_transformer(),
            "vae": latent16_vae(_VAE_SEED, scaling_factor=0.3611, shift_factor=0.1159),
            "scheduler": _build_scheduler(),
        }
    return FluxPipeline(**components)


def build(directory: Path) -> None:
    """Save the tiny FLUX pipeline in diffusers format into ``directory``."""
    build_tiny_pipeline().save_pretrained(directory, safe_serialization=True)
    write_clip_vocabulary(directory / "tokenizer")
