"""What differs between model families when a pipeline is called: one adapter per family.

``air_registry/architectures.py`` names each architecture's family; the inference runner asks the
family's adapter for the arguments of one pipeline call. A new model family is an adapter here, a
row per architecture there, and catalog lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from imagewire.tasks.jobs import InferenceJob


class Family(Protocol):
    def call_arguments(self, owners: Sequence[InferenceJob]) -> dict[str, Any]:
        """The pipeline's arguments for one call holding one image of each of ``owners`` (jobs may repeat),
        but the generators, which the runner adds."""
        ...


class StableDiffusion:
    """SD 1.x/2.x and SDXL: prompts and negative prompts per image, classifier-free guidance."""

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


FAMILIES: Mapping[str, Family] = {
    "sd": StableDiffusion(),
    "sdxl": StableDiffusion(),
}
