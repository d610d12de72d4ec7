"""The embedded LoRA ``imagewire:tiny-lora@1`` (builder ``tiny-lora``): low-rank updates of the tiny model's
UNet attention and text encoder, saved as a LoRA file in the diffusers/peft format that trained LoRAs have.

The file holds ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` pairs for every UNet attention projection
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and ``text_encoder.<module>...`` pairs for the text encoder's
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), as diffusers' LoRA training writes it with the text
encoder trained too, so loading it runs the same code as a LoRA downloaded for a real model. The weights are
random (from a fixed seed), with both factors drawn rather than ``lora_B`` starting at zero, so that the LoRA
visibly changes images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from imagewire.air_registry.model_files import LORA_WEIGHTS
from imagewire.air_registry.tiny.sd import _build_text_encoder, _build_unet

MARKER = LORA_WEIGHTS  # the file that shows a build is complete

LORA_SEED = 11
RANK = 4
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def write_lora(path: Path, *, seed: int = LORA_SEED) -> Path:
    """Write a LoRA for the tiny model to ``path`` (a ``.safetensors`` file); other seeds give other LoRAs."""
    with torch.random.fork_rng(devices=[]):
        unet, text_encoder = _build_unet(), _build_text_encoder()
        torch.manual_seed(seed)
        unet.add_adapter(_config(ATTENTION_PROJECTIONS))
        inject_adapter_in_model(_config(TEXT_PROJECTIONS), text_encoder)  # in place
    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder), weight_name=path.name,
        safe_serialization=True)
    return path


def _config(targets: list[str]) -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights=False)


def build(directory: Path) -> None:
    """Save the tiny LoRA into ``directory`` under the file name diffusers looks for."""
    write_lora(Path(directory) / LORA_WEIGHTS)
