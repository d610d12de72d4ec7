"""What differs between model families when a pipeline is called: one adapter per family.

``air_registry/architectures.py`` names each architecture's family; the inference runner asks the
family's adapter for the arguments of one pipeline call. A new model family is an adapter here, a
row per architecture there, and catalog lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from imagewire.air_registry import ARCHITECTURES
from imagewire.tasks.jobs import InferenceJob


class Family(Protocol):
    def call_arguments(self, owners: Sequence[InferenceJob]) -> dict[str, Any]:
        """The pipeline's arguments for one call holding one image of each of ``owners`` (jobs may repeat),
        but the generators and the step callback, which the runner adds."""
        ...

    def preview(self, latents: torch.Tensor) -> Image.Image | None:
        """A rough picture of one image's latents mid-way (no VAE decode), or None where there is none."""
        ...


def linear_preview(latents: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor) -> Image.Image:
    """Latent channels mixed straight into RGB: what the image is becoming, at the latents' resolution,
    for the cost of one small matrix product instead of a VAE decode."""
    rgb = torch.einsum("chw,cr->hwr", latents.float().cpu(), factors) + bias
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


class StableDiffusion:
    """SD 1.x/2.x and SDXL: prompts and negative prompts per image, classifier-free guidance."""

    def __init__(self, preview_factors: list[list[float]], preview_bias: list[float]) -> None:
        # How each of the 4 latent channels contributes to R, G and B (fitted on decoded images).
        self.preview_factors = torch.tensor(preview_factors)
        self.preview_bias = torch.tensor(preview_bias)

    def preview(self, latents: torch.Tensor) -> Image.Image | None:
        if latents.shape[0] != self.preview_factors.shape[0]:
            return None
        return linear_preview(latents, self.preview_factors, self.preview_bias)

    def call_arguments(self, owners: Sequence[InferenceJob]) -> dict[str, Any]:
        first = owners[0]  # the owners share a batch key: one value for everything but prompts and images
        arguments: dict[str, Any] = {
            "prompt": [job.prompt for job in owners],
            "negative_prompt": [job.negative_prompt for job in owners] if first.negative_prompt else None,
            "num_inference_steps": first.steps,
            "guidance_scale": first.cfg_scale,
        }
        if first.init_image is not None:
            arguments["image"] = [job.init_image for job in owners]
            arguments["strength"] = first.strength
        else:
            arguments["width"] = first.width
            arguments["height"] = first.height
        if first.mask_image is not None:
            arguments["mask_image"] = [job.mask_image for job in owners]
            arguments["width"] = first.width
            arguments["height"] = first.height
        if first.controlnets:
            arguments.update(controlnet_arguments(owners))
        return arguments


def controlnet_arguments(owners: Sequence[InferenceJob]) -> dict[str, Any]:
    """The ControlNet pipelines' arguments: guide images per image (one per ControlNet), the rest shared.

    Text-to-image ControlNet pipelines take the guides as ``image``; the others, whose ``image`` is the
    seed image, as ``control_image``. Each ControlNet's guides go as one array of the call's images (the
    pipelines take a batch of guides per ControlNet in that form only), in [0, 1] as from PIL images.
    """
    first = owners[0]
    guides = "image" if first.init_image is None else "control_image"
    return {
        guides: [np.stack([np.asarray(job.guide_images[index].convert("RGB"), dtype=np.float32) / 255
                           for job in owners]) for index in range(len(first.controlnets))],
        "controlnet_conditioning_scale": [control.weight for control in first.controlnets],
        "control_guidance_start": [control.start for control in first.controlnets],
        "control_guidance_end": [control.end for control in first.controlnets],
    }


def _flow_arguments(owners: Sequence[InferenceJob]) -> dict[str, Any]:
    """What the flow-matching pipelines (FLUX, SD 3) share: prompts per image, and always a size:
    their image-to-image pipelines otherwise resize the seed image to the model's default size."""
    first = owners[0]
    arguments: dict[str, Any] = {
        "prompt": [job.prompt for job in owners],
        "num_inference_steps": first.steps,
        "guidance_scale": first.cfg_scale,
        "width": first.width,
        "height": first.height,
    }
    max_sequence_length = ARCHITECTURES[first.model.architecture].max_sequence_length
    if max_sequence_length is not None:
        arguments["max_sequence_length"] = max_sequence_length
    if first.init_image is not None:
        arguments["image"] = [job.init_image for job in owners]
        arguments["strength"] = first.strength
    if first.mask_image is not None:
        # FLUX.1 Fill's own pipeline, or the inpainting pipelines diffusers derives from the others'.
        arguments["mask_image"] = [job.mask_image for job in owners]
    return arguments


class _NoPreview:
    """Flow-matching latents (FLUX packs them in 2×2 patches, SD 3 has 16 channels) have no fitted mix into
    RGB yet: progress goes out without previews."""

    def preview(self, latents: torch.Tensor) -> Image.Image | None:
        return None


class Flux(_NoPreview):
    """FLUX.1: CLIP and T5 read each prompt. FLUX is guidance-distilled: ``CFGScale`` sets its own
    guidance, the embedded guidance strength of [dev] (one pass per step, not classifier-free
    guidance's two); [schnell] has no guidance embedding and ignores it. FLUX takes no negative
    prompt, so one is ignored, as the public API does."""

    def call_arguments(self, owners: Sequence[InferenceJob]) -> dict[str, Any]:
        return _flow_arguments(owners)


class StableDiffusion3(_NoPreview):
    """SD 3 and 3.5: two CLIP encoders and T5 read each prompt; classifier-free guidance with
    negative prompts, as in SD."""

    def call_arguments(self, owners: Sequence[InferenceJob]) -> dict[str, Any]:
        arguments = _flow_arguments(owners)
        first = owners[0]
        arguments["negative_prompt"] = [job.negative_prompt for job in owners] if first.negative_prompt else None
        return arguments


class FluxKontext(_NoPreview):
    """FLUX.1 Kontext [dev]: as FLUX, and a seed image is the picture to edit as the prompt says. The
    model takes the whole image as its reference, so there is no strength. Its pipeline scales every
    output to about a megapixel unless told the area: the area asked for is width × height."""

    def call_arguments(self, owners: Sequence[InferenceJob]) -> dict[str, Any]:
        arguments = _flow_arguments(owners)
        arguments.pop("strength", None)
        arguments["max_area"] = arguments["width"] * arguments["height"]
        return arguments


FAMILIES: Mapping[str, Family] = {
    "sd": StableDiffusion(
        [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
        [0.0, 0.0, 0.0]),
    "sdxl": StableDiffusion(
        [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
        [0.1084, -0.0175, -0.0011]),
    "flux": Flux(),
    "sd3": StableDiffusion3(),
    "flux-kontext": FluxKontext(),
}
