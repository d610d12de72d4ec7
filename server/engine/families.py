"""What differs between model families when a pipeline is called: one adapter per family.

``air_registry/architectures.py`` names each architecture's family; the inference runner asks the
family's adapter for the arguments of one pipeline call. A new model family is an adapter here, a
row per architecture there, and catalog lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from imagewire.air_registry import ARCHITECTURES
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
        return arguments


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
    return arguments


class Flux:
    """FLUX.1: CLIP and T5 read each prompt. FLUX is guidance-distilled: ``CFGScale`` sets its own
    guidance, the embedded guidance strength of [dev] (one pass per step, not classifier-free
    guidance's two); [schnell] has no guidance embedding and ignores it. FLUX takes no negative
    prompt, so one is ignored, as the public API does."""

    def call_arguments(self, owners: Sequence[InferenceJob]) -> dict[str, Any]:
        return _flow_arguments(owners)


class StableDiffusion3:
    """SD 3 and 3.5: two CLIP encoders and T5 read each prompt; classifier-free guidance with
    negative prompts, as in SD."""

    def call_arguments(self, owners: Sequence[InferenceJob]) -> dict[str, Any]:
        arguments = _flow_arguments(owners)
        first = owners[0]
        arguments["negative_prompt"] = [job.negative_prompt for job in owners] if first.negative_prompt else None
        return arguments


class FluxKontext:
    """FLUX.1 Kontext [dev]: as FLUX, and a seed image is the picture to edit as the prompt says. The
    model takes the whole image as its reference, so there is no strength. Its pipeline scales every
    output to about a megapixel unless told the area: the area asked for is width × height."""

    def call_arguments(self, owners: Sequence[InferenceJob]) -> dict[str, Any]:
        arguments = _flow_arguments(owners)
        arguments.pop("strength", None)
        arguments["max_area"] = arguments["width"] * arguments["height"]
        return arguments


FAMILIES: Mapping[str, Family] = {
    "sd": StableDiffusion(),
    "sdxl": StableDiffusion(),
    "flux": Flux(),
    "sd3": StableDiffusion3(),
    "flux-kontext": FluxKontext(),
}
