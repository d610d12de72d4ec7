"""The embedded model ``imagewire:tiny-controlnet@1`` (builder ``tiny-controlnet``): a ControlNet that fits
``imagewire:tiny@1`` (and ``imagewire:tiny-inpaint@1``, made from the same UNet shapes).

A real ControlNet starts from zero-initialised output convolutions, so it changes nothing until trained.
This one draws those from fixed seeds too, and draws the guide image's path so that the picture reaches the
output: with random weights its guide image visibly steers the result, which is what tests of the
ControlNet path need to see.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.controlnets.controlnet import ControlNetModel

from imagewire.air_registry.model_files import COMPONENT_CONFIG
from imagewire.air_registry.tiny.sd import build_tiny_pipeline

MARKER = COMPONENT_CONFIG  # a single model, not a pipeline: its config.json, not model_index.json

_CONTROLNET_SEED = 5
_OUTPUT_SEED = 6
# The guide image is brought down to latent size by 3 stride-2 convolutions: the VAE's factor of 8.
CONDITIONING_CHANNELS = (8, 8, 16, 16)
_OUTPUT_STD = 0.2
_CONDITIONING_GAIN = 20.0  # how strongly the guide image speaks; chosen so that guides visibly differ


def build_tiny_controlnet() -> ControlNetModel:
    with torch.random.fork_rng(devices=[]):
        unet = build_tiny_pipeline().unet
        torch.manual_seed(_CONTROLNET_SEED)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
        generator = torch.Generator("cpu").manual_seed(_OUTPUT_SEED)
        with torch.no_grad():
            for module in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
                for parameter in module.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * _OUTPUT_STD)
            # The guide image's path, drawn so that its picture survives to the output (He initialisation,
            # no biases): with the default initialisation the biases drown the picture within a few layers.
            for conv in controlnet.controlnet_cond_embedding.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
                    if conv.bias is not None:
                        conv.bias.zero_()
            controlnet.controlnet_cond_embedding.conv_out.weight.mul_(_CONDITIONING_GAIN)
    return controlnet


def build(directory: Path) -> None:
    build_tiny_controlnet().save_pretrained(directory, safe_serialization=True)
