"""The embedded SDXL model ``imagewire:tiny-sdxl@1`` (builder ``tiny-sdxl``): a Stable Diffusion XL
pipeline small enough to run anywhere, with everything that makes SDXL differ from SD 1.x.

Two CLIP text encoders whose hidden states are joined for cross-attention (the second with a projection
that gives the pooled embedding), a UNet conditioned on that pooled embedding and on the size and crop
"time ids" (``addition_embed_type="text_time"``), SDXL's latent scaling factor and its usual sampler.
The text encoders have three layers, so that every clipSkip value leaves some. Random weights from fixed
seeds: the images are noise, but every SDXL code path runs, the refiner hand-off included (see
``sdxl_refiner.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from imagewire.air_registry.tiny.sd import _build_vae
from imagewire.air_registry.tiny.tokenizers import (
    CLIP_MAX_LENGTH,
    END_TOKEN,
    START_TOKEN,
    build_clip_tokenizer,
    clip_vocab,
    write_clip_vocabulary,
)

_TEXT_ENCODER_SEED = 41
_TEXT_ENCODER_2_SEED = 42  # the refiner's text encoder is this one, as SDXL's refiner shares OpenCLIP-G
_UNET_SEED = 43
_VAE_SEED = 44             # base and refiner decode the same latents with the same VAE

TEXT_WIDTH = 32            # hidden size of each text encoder
TIME_EMBED_DIM = 8         # per "time id" (sizes, crop, and the refiner's aesthetic score)
SDXL_SCALING_FACTOR = 0.13025


def text_config() -> CLIPTextConfig:
    vocab = clip_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TEXT_WIDTH,
        bos_token_id=vocab[START_TOKEN],
        eos_token_id=vocab[END_TOKEN],
        pad_token_id=vocab[END_TOKEN],
    )


def build_text_encoder_2() -> CLIPTextModelWithProjection:
    torch.manual_seed(_TEXT_ENCODER_2_SEED)
    return CLIPTextModelWithProjection(text_config())


def build_unet(*, seed: int, cross_attention_dim: int, time_ids: int) -> UNet2DConditionModel:
    """An SDXL UNet: ``time_ids`` conditioning values beside the pooled text embedding."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=time_ids * TIME_EMBED_DIM + TEXT_WIDTH,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
    )


def build_vae() -> Any:
    return _build_vae(seed=_VAE_SEED, scaling_factor=SDXL_SCALING_FACTOR)


def build_scheduler() -> EulerDiscreteScheduler:
    # SDXL's own sampler and noise schedule.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny_sdxl_pipeline() -> StableDiffusionXLPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TEXT_ENCODER_SEED)
        text_encoder = CLIPTextModel(text_config())
        components: dict[str, Any] = {
            "vae": build_vae(),
            "text_encoder": text_encoder,
            "text_encoder_2": build_text_encoder_2(),
            "tokenizer": build_clip_tokenizer(),
            "tokenizer_2": build_clip_tokenizer(),
            # Cross-attention sees both encoders' hidden states side by side; six time ids: the original
            # size, the crop's corner and the target size.
            "unet": build_unet(seed=_UNET_SEED, cross_attention_dim=2 * TEXT_WIDTH, time_ids=6),
            "scheduler": build_scheduler(),
        }
    return StableDiffusionXLPipeline(**components)


def save(pipe: Any, directory: Path) -> None:
    pipe.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        if (Path(directory) / name).is_dir():
            write_clip_vocabulary(Path(directory) / name)


def build(directory: Path) -> None:
    save(build_tiny_sdxl_pipeline(), directory)
