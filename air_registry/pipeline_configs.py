"""The diffusers configuration of each architecture a single-file checkpoint can have: our own tables of the
published hyperparameters, from which ``single_file.py`` writes the folder diffusers reads a single file with.

A component's table holds only what differs from its class's defaults: diffusers and transformers fill in the
rest when they read a ``config.json``. Pure data: nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# ---------------------------------------------------------------- components

_VAE_BLOCKS: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32,
}
_SD_VAE = {**_VAE_BLOCKS, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215}
_SDXL_VAE = {**_VAE_BLOCKS, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025,
             "force_upcast": True}
# The 16-channel VAEs of the flow-matching models have no quant convolutions, and shift their latents too.
_SD3_VAE = {**_VAE_BLOCKS, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305,
            "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
_FLUX_VAE = {**_SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}

_CLIP_COMMON: dict[str, Any] = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-05,
                                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
# OpenAI's CLIP ViT-L/14 text tower (SD 1.x, SDXL's first encoder, SD 3's and FLUX's CLIP).
_CLIP_L = {**_CLIP_COMMON, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
           "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768}
# OpenCLIP ViT-H/14 as SD 2.x uses it: its last layer is never read, so the model has 23.
_OPENCLIP_H = {**_CLIP_COMMON, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
               "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}
# OpenCLIP ViT-bigG/14 (SDXL's second encoder, SD 3's CLIP-G), with its projection.
_OPENCLIP_G = {**_CLIP_COMMON, "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
               "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280}
# Google's T5 v1.1 XXL encoder (SD 3, FLUX).
_T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
           "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
           "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
           "layer_norm_epsilon": 1e-06, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}

_SD_UNET: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "norm_eps": 1e-05, "norm_num_groups": 32,
}
_SD2_UNET = {**_SD_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
             "use_linear_projection": True, "sample_size": 96}
_SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "in_channels": 4,
    "out_channels": 4, "layers_per_block": 2, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "norm_num_groups": 32,
}
_SDXL_REFINER_UNET: dict[str, Any] = {
    **_SDXL_UNET, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
_SD3_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
}

# The noise schedules the models were trained with.
_SD_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
}
# SD 2.x's 768-pixel models predict velocity, not noise.
_SD2_SCHEDULER = {**_SD_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
                  "clip_sample": False}
_SDXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "interpolation_type": "linear",
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading", "use_karras_sigmas": False,
}
_FLUX_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
_SD3_SCHEDULER: dict[str, Any] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                  "shift": 3.0}

# ---------------------------------------------------------------- tokenizers

CLIP = "clip"
T5 = "t5"


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str            # CLIP (a byte-level BPE) or T5 (a SentencePiece model)
    max_length: int
    pad_token: str = ""  # CLIP's: OpenAI's towers pad with the end marker, OpenCLIP's with "!"


_CLIP_OPENAI = TokenizerSpec(CLIP, 77, "<|endoftext|>")
_CLIP_OPENCLIP = TokenizerSpec(CLIP, 77, "!")

# ---------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class Component:
    library: str         # "diffusers" or "transformers"
    class_name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerSpec | None = None
    # Where its weights are in the original layout; a checkpoint without any of these names lacks it.
    weights_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineConfig:
    pipeline: str
    components: Mapping[str, Component | None]
    # Extra entries of model_index.json (the pipeline's own options).
    options: Mapping[str, Any] = field(default_factory=dict)
    # Components a pipeline runs without (SD 3's T5): left out when the checkpoint lacks their weights.
    optional: tuple[str, ...] = ()


def _clip_tokenizer(spec: TokenizerSpec) -> Component:
    return Component("transformers", "CLIPTokenizer", tokenizer=spec)


_T5_TOKENIZER = Component("transformers", "T5TokenizerFast", tokenizer=TokenizerSpec(T5, 512))
_SD_PREFIXES = {
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.",),
    "text_encoder": ("cond_stage_model.",),
}
# Where full FLUX and SD 3 files (ComfyUI's "checkpoint" saves) keep the pieces beside the transformer.
_FLOW_PREFIXES = {
    "vae": ("vae.", "first_stage_model."),
    "text_encoder_clip_l": ("text_encoders.clip_l.",),
    "text_encoder_clip_g": ("text_encoders.clip_g.",),
    "text_encoder_t5": ("text_encoders.t5xxl.",),
}


def _sd(unet: Mapping[str, Any], text_encoder: Mapping[str, Any], tokenizer: TokenizerSpec,
        scheduler: Mapping[str, Any], pipeline: str = "StableDiffusionPipeline") -> PipelineConfig:
    return PipelineConfig(pipeline, {
        "unet": Component("diffusers", "UNet2DConditionModel", unet, weights_prefixes=_SD_PREFIXES["unet"]),
        "vae": Component("diffusers", "AutoencoderKL", _SD_VAE, weights_prefixes=_SD_PREFIXES["vae"]),
        "text_encoder": Component("transformers", "CLIPTextModel", text_encoder,
                                  weights_prefixes=_SD_PREFIXES["text_encoder"]),
        "tokenizer": _clip_tokenizer(tokenizer),
        "scheduler": Component("diffusers", scheduler["_class_name"], scheduler),
        "safety_checker": None,
        "feature_extractor": None,
    }, options={"requires_safety_checker": False})


def _sdxl(unet: Mapping[str, Any], pipeline: str, *, refiner: bool = False) -> PipelineConfig:
    components: dict[str, Component | None] = {
        "unet": Component("diffusers", "UNet2DConditionModel", unet, weights_prefixes=("model.diffusion_model.",)),
        "vae": Component("diffusers", "AutoencoderKL", _SDXL_VAE, weights_prefixes=("first_stage_model.",)),
        "text_encoder": None if refiner else Component(
            "transformers", "CLIPTextModel", _CLIP_L, weights_prefixes=("conditioner.embedders.0.",)),
        "tokenizer": None if refiner else _clip_tokenizer(_CLIP_OPENAI),
        "text_encoder_2": Component("transformers", "CLIPTextModelWithProjection", _OPENCLIP_G,
                                    weights_prefixes=(f"conditioner.embedders.{0 if refiner else 1}.",)),
        "tokenizer_2": _clip_tokenizer(_CLIP_OPENCLIP),
        "scheduler": Component("diffusers", "EulerDiscreteScheduler", _SDXL_SCHEDULER),
    }
    options = ({"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False} if refiner
               else {"force_zeros_for_empty_prompt": True})
    return PipelineConfig(pipeline, components, options=options)


def _flux(transformer: Mapping[str, Any], pipeline: str) -> PipelineConfig:
    return PipelineConfig(pipeline, {
        "transformer": Component("diffusers", "FluxTransformer2DModel", transformer,
                                 weights_prefixes=("model.diffusion_model.", "")),
        "vae": Component("diffusers", "AutoencoderKL", _FLUX_VAE, weights_prefixes=_FLOW_PREFIXES["vae"]),
        "text_encoder": Component("transformers", "CLIPTextModel", _CLIP_L,
                                  weights_prefixes=_FLOW_PREFIXES["text_encoder_clip_l"]),
        "tokenizer": _clip_tokenizer(_CLIP_OPENAI),
        "text_encoder_2": Component("transformers", "T5EncoderModel", _T5_XXL,
                                    weights_prefixes=_FLOW_PREFIXES["text_encoder_t5"]),
        "tokenizer_2": _T5_TOKENIZER,
        "scheduler": Component("diffusers", "FlowMatchEulerDiscreteScheduler", _FLUX_SCHEDULER),
    })


def _sd3(transformer: Mapping[str, Any]) -> PipelineConfig:
    return PipelineConfig("StableDiffusion3Pipeline", {
        "transformer": Component("diffusers", "SD3Transformer2DModel", transformer,
                                 weights_prefixes=("model.diffusion_model.", "")),
        "vae": Component("diffusers", "AutoencoderKL", _SD3_VAE, weights_prefixes=_FLOW_PREFIXES["vae"]),
        "text_encoder": Component("transformers", "CLIPTextModelWithProjection", _CLIP_L,
                                  weights_prefixes=_FLOW_PREFIXES["text_encoder_clip_l"]),
        "tokenizer": _clip_tokenizer(_CLIP_OPENAI),
        "text_encoder_2": Component("transformers", "CLIPTextModelWithProjection", _OPENCLIP_G,
                                    weights_prefixes=_FLOW_PREFIXES["text_encoder_clip_g"]),
        "tokenizer_2": _clip_tokenizer(_CLIP_OPENCLIP),
        "text_encoder_3": Component("transformers", "T5EncoderModel", _T5_XXL,
                                    weights_prefixes=_FLOW_PREFIXES["text_encoder_t5"]),
        "tokenizer_3": _T5_TOKENIZER,
        "scheduler": Component("diffusers", "FlowMatchEulerDiscreteScheduler", _SD3_SCHEDULER),
    }, optional=("text_encoder_3", "tokenizer_3"))


_FLUX_FILL = {**_FLUX_TRANSFORMER, "in_channels": 384, "out_channels": 64}
_FLUX_SCHNELL = {**_FLUX_TRANSFORMER, "guidance_embeds": False}

PIPELINE_CONFIGS: Mapping[str, PipelineConfig] = MappingProxyType({
    "sd15": _sd(_SD_UNET, _CLIP_L, _CLIP_OPENAI, _SD_SCHEDULER),
    "sd15-inpaint": _sd({**_SD_UNET, "in_channels": 9}, _CLIP_L, _CLIP_OPENAI, _SD_SCHEDULER,
                        "StableDiffusionInpaintPipeline"),
    "sd21": _sd(_SD2_UNET, _OPENCLIP_H, _CLIP_OPENCLIP, _SD2_SCHEDULER),
    "sdxl": _sdxl(_SDXL_UNET, "StableDiffusionXLPipeline"),
    "sdxl-inpaint": _sdxl({**_SDXL_UNET, "in_channels": 9}, "StableDiffusionXLInpaintPipeline"),
    "sdxl-refiner": _sdxl(_SDXL_REFINER_UNET, "StableDiffusionXLImg2ImgPipeline", refiner=True),
    "flux1-dev": _flux(_FLUX_TRANSFORMER, "FluxPipeline"),
    "flux1-schnell": _flux(_FLUX_SCHNELL, "FluxPipeline"),
    "flux1-kontext": _flux(_FLUX_TRANSFORMER, "FluxKontextPipeline"),
    "flux1-fill": _flux(_FLUX_FILL, "FluxFillPipeline"),
    "sd3": _sd3(_SD3_TRANSFORMER),
    "sd35-medium": _sd3({**_SD3_TRANSFORMER, "qk_norm": "rms_norm", "pos_embed_max_size": 384,
                         "dual_attention_layers": list(range(13))}),
    "sd35-large": _sd3({**_SD3_TRANSFORMER, "num_layers": 38, "num_attention_heads": 38,
                        "caption_projection_dim": 2432, "qk_norm": "rms_norm"}),
})
