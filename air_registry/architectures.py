"""The model architectures this server loads: one row each, with everything that differs between them.

Pure data (diffusers classes are named as strings), so that the catalog and the task layer can read
it without torch; ``loader`` turns the names into classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Architecture:
    name: str           # what catalog entries, modelSearch and compatibility checks (LoRAs, …) name
    family: str         # the code path that runs it (``server/engine/families.py``)
    # What a catalog entry's missing ``defaults`` become.
    size: int
    steps: int
    cfg_scale: float = 7.0
    strength: float = 0.8
    # The pipeline class that reads a single-file checkpoint; None: folders and hub repos only.
    single_file_pipeline: str | None = None
    # Refiners transform an image and have no text-to-image pipeline.
    image_to_image_only: bool = False
    # Inpainting checkpoints (a UNet that also reads the mask and the masked image: 9 input channels)
    # only repaint: a request needs a seedImage and a maskImage or outpaint.
    inpainting_only: bool = False
    # The architecture whose add-ons (ControlNets, …) fit this one: an inpainting checkpoint takes the
    # ControlNets of the checkpoint it was trained from. Empty: its own name.
    base: str = ""
    # The task type its models serve (its wire name in the Python SDK's spelling), and how their files lie:
    # ``diffusers`` (a pipeline folder), ``transformers`` (a model folder with config.json) or
    # ``weights_file`` (one file of weights, as super-resolution networks come).
    task: str = "imageInference"
    layout: str = "diffusers"

    @property
    def compatible(self) -> str:
        """The architecture name that add-ons for this one are catalogued under."""
        return self.base or self.name


# Embedded test models have architectures of their own ("tiny"): nothing made for a real
# architecture (a LoRA, a VAE) fits their shapes, though the same code path runs them.
ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType({
    arch.name: arch for arch in (
        Architecture("tiny", family="sd", size=256, steps=8),
        Architecture("sd15", family="sd", size=512, steps=20, single_file_pipeline="StableDiffusionPipeline"),
        Architecture("sd21", family="sd", size=768, steps=20, single_file_pipeline="StableDiffusionPipeline"),
        Architecture("sdxl", family="sdxl", size=1024, steps=30, single_file_pipeline="StableDiffusionXLPipeline"),
        Architecture("sdxl-refiner", family="sdxl", size=1024, steps=30, strength=0.3,
                     single_file_pipeline="StableDiffusionXLImg2ImgPipeline", image_to_image_only=True),
        Architecture("tiny-inpaint", family="sd", size=256, steps=8, inpainting_only=True, base="tiny"),
        Architecture("sd15-inpaint", family="sd", size=512, steps=20, inpainting_only=True, base="sd15",
                     single_file_pipeline="StableDiffusionInpaintPipeline"),
        Architecture("sdxl-inpaint", family="sdxl", size=1024, steps=30, inpainting_only=True, base="sdxl",
                     single_file_pipeline="StableDiffusionXLInpaintPipeline"),
        # The tools beside imageInference; ``family`` names the adapter in that task's runner
        # (server/engine/<task>.py). Their size and steps mean nothing and are never used.
        *(Architecture(name, family=family, size=512, steps=1, task=task, layout=layout)
          for name, family, task, layout in (
            ("tiny-upscaler", "spandrel", "imageUpscale", "weights_file"),
            ("esrgan", "spandrel", "imageUpscale", "weights_file"),
            ("tiny-background", "segformer", "imageBackgroundRemoval", "transformers"),
            ("birefnet", "birefnet", "imageBackgroundRemoval", "transformers"),
            ("rmbg-1.4", "rmbg", "imageBackgroundRemoval", "transformers"),
            ("tiny-caption", "blip", "imageCaption", "transformers"),
            ("blip", "blip", "imageCaption", "transformers"),
            ("tiny-prompt", "causal-lm", "promptEnhance", "transformers"),
            ("gpt2", "causal-lm", "promptEnhance", "transformers"),
            ("llama", "chat-lm", "promptEnhance", "transformers"),
        )),
    )
})
