"""The model architectures this server loads: one row each, with everything that differs between them.

Pure data (diffusers classes are named as strings), so that the catalog and the task layer can read
it without torch; ``loader`` turns the names into classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from imagewire.air_registry.samplers import DIFFUSION, FLOW


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
    # The architectures whose images a refiner of this one finishes (the request's ``refiner``).
    refines: tuple[str, ...] = ()
    # The kind of sampler that fits its models (``samplers.py``): checked before the device.
    sampling: str = DIFFUSION
    # The precision its weights run in on CUDA devices, as the model was trained (CPUs use float32).
    cuda_dtype: str = "float16"
    # How many tokens of the prompt the T5 encoder reads (FLUX, SD 3); None: the pipeline's default.
    max_sequence_length: int | None = None
    # The diffusers pipeline class its folders and hub repos load as; None: the one their
    # model_index.json names (so a folder of another FLUX variant's layout can run as this one).
    pipeline: str | None = None
    # Inpainting checkpoints (a denoiser that also reads the mask and the masked image: a UNet with 9
    # input channels, FLUX.1 Fill) only repaint: a request needs a seedImage and a maskImage or outpaint.
    inpainting_only: bool = False
    # What its pipelines take beyond a prompt and a seed image: a mask to repaint through (maskImage,
    # outpaint), ControlNets. Refused before the device where they do not: FLUX.1 Kontext has no inpainting
    # pipeline, and no ControlNet for the flow-matching models is catalogued or run yet.
    masks: bool = True
    controlnets: bool = True
    # The architecture whose add-ons (ControlNets, …) fit this one: an inpainting checkpoint takes the
    # ControlNets of the checkpoint it was trained from. Empty: its own name.
    base: str = ""
    # The task type its models serve (its wire name in the Python SDK's spelling), and how their files lie:
    # ``diffusers`` (a pipeline folder), ``transformers`` (a model folder with config.json) or
    # ``weights_file`` (one file of weights, as super-resolution networks come).
    task: str = "imageInference"
    layout: str = "diffusers"
    # The embedded builder whose saved model gives a single file of this architecture its configs (and
    # the components it lacks); None: diffusers finds the published configs itself (hub or its cache).
    single_file_config: str | None = None

    @property
    def compatible(self) -> str:
        """The architecture name that add-ons for this one are catalogued under."""
        return self.base or self.name


# What a file in a models folder is when its architecture cannot be told (``models_dir.py``): listed, with why,
# and never run.
UNKNOWN_ARCHITECTURE = "unknown"

# Embedded test models have architectures of their own ("tiny"): nothing made for a real
# architecture (a LoRA, a VAE) fits their shapes, though the same code path runs them.
ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType({
    arch.name: arch for arch in (
        Architecture("tiny", family="sd", size=256, steps=8, single_file_pipeline="StableDiffusionPipeline",
                     single_file_config="tiny-sd"),
        Architecture("sd15", family="sd", size=512, steps=20, single_file_pipeline="StableDiffusionPipeline"),
        Architecture("sd21", family="sd", size=768, steps=20, single_file_pipeline="StableDiffusionPipeline"),
        Architecture("sdxl", family="sdxl", size=1024, steps=30, single_file_pipeline="StableDiffusionXLPipeline"),
        Architecture("sdxl-refiner", family="sdxl", size=1024, steps=30, strength=0.3,
                     single_file_pipeline="StableDiffusionXLImg2ImgPipeline", image_to_image_only=True,
                     refines=("sdxl",)),
        Architecture("tiny-sdxl", family="sdxl", size=256, steps=8),
        Architecture("tiny-sdxl-refiner", family="sdxl", size=256, steps=8, strength=0.3, image_to_image_only=True,
                     refines=("tiny-sdxl",)),
        Architecture("tiny-inpaint", family="sd", size=256, steps=8, inpainting_only=True, base="tiny"),
        Architecture("sd15-inpaint", family="sd", size=512, steps=20, inpainting_only=True, base="sd15",
                     single_file_pipeline="StableDiffusionInpaintPipeline"),
        Architecture("sdxl-inpaint", family="sdxl", size=1024, steps=30, inpainting_only=True, base="sdxl",
                     single_file_pipeline="StableDiffusionXLInpaintPipeline"),
        Architecture(UNKNOWN_ARCHITECTURE, family="none", size=512, steps=1, task="none", layout="weights_file"),
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
            ("tiny-masking", "owlvit", "imageMasking", "transformers"),
            ("owlvit", "owlvit", "imageMasking", "transformers"),
            ("owlv2", "owlv2", "imageMasking", "transformers"),
        )),
        # Flow-matching models. FLUX.1 [schnell] is distilled to 4 steps without guidance; [dev] takes
        # FLUX's own guidance (CFGScale, see families.py) and reads twice as many T5 tokens.
        # A tiny FLUX transformer saved alone (float8, GGUF) takes the embedded model's other components.
        Architecture("tiny-flux", family="flux", size=256, steps=4, cfg_scale=3.5, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=64, controlnets=False,
                     single_file_pipeline="FluxPipeline", single_file_config="tiny-flux"),
        # Kontext's code path on the tiny FLUX's components (reference images, the seed image to edit).
        Architecture("tiny-flux-kontext", family="flux-kontext", size=256, steps=4, cfg_scale=2.5, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=64, pipeline="FluxKontextPipeline", masks=False,
                     controlnets=False),
        Architecture("tiny-sd3", family="sd3", size=256, steps=4, cfg_scale=4.5, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=64, controlnets=False),
        # [schnell], Kontext and Fill have [dev]'s transformer blocks: the LoRAs people train on [dev] (and
        # files tell apart only as FLUX.1) apply to them too.
        Architecture("flux1-schnell", family="flux", size=1024, steps=4, cfg_scale=0.0, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=256, single_file_pipeline="FluxPipeline",
                     controlnets=False, base="flux1-dev"),
        Architecture("flux1-dev", family="flux", size=1024, steps=28, cfg_scale=3.5, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=512, single_file_pipeline="FluxPipeline",
                     controlnets=False),
        # Kontext [dev] edits the seed image as the prompt says; Fill [dev] inpaints.
        Architecture("flux1-kontext", family="flux-kontext", size=1024, steps=28, cfg_scale=2.5, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=512, pipeline="FluxKontextPipeline",
                     single_file_pipeline="FluxKontextPipeline", masks=False, controlnets=False, base="flux1-dev"),
        Architecture("flux1-fill", family="flux", size=1024, steps=50, cfg_scale=30.0, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=512, pipeline="FluxFillPipeline",
                     single_file_pipeline="FluxFillPipeline",
                     inpainting_only=True, controlnets=False, base="flux1-dev"),
        # SD 3 medium was released in float16; SD 3.5 in bfloat16.
        Architecture("sd3", family="sd3", size=1024, steps=28, cfg_scale=7.0, sampling=FLOW,
                     single_file_pipeline="StableDiffusion3Pipeline", controlnets=False),
        Architecture("sd35-medium", family="sd3", size=1024, steps=40, cfg_scale=4.5, sampling=FLOW,
                     cuda_dtype="bfloat16", single_file_pipeline="StableDiffusion3Pipeline", controlnets=False),
        Architecture("sd35-large", family="sd3", size=1024, steps=28, cfg_scale=3.5, sampling=FLOW,
                     cuda_dtype="bfloat16", single_file_pipeline="StableDiffusion3Pipeline", controlnets=False),
    )
})


# The architecture names of Runware's public API (modelSearch's ``architecture``, in its docs' list), each with
# the rows above that its models would be filed under. The public names are coarser: "sdxl" is SDXL 1.0 of every
# type (base, refiner, inpainting), which is why a public name that is also a row's name means the public set.
# A name with no rows is one the public API defines that no model here can be (a hosted model, a distillation
# this server has no row for); searching for it finds nothing.
PUBLIC_ARCHITECTURES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "sd1x": ("sd15", "sd15-inpaint"),
    "sdxl": ("sdxl", "sdxl-refiner", "sdxl-inpaint"),
    "flux1s": ("flux1-schnell",),
    "flux1d": ("flux1-dev", "flux1-fill"),
    "fluxkontextdev": ("flux1-kontext",),
    "sd3": ("sd3", "sd35-medium", "sd35-large"),
    **dict.fromkeys((
        "fluxpro", "fluxultra", "fluxkontextpro", "fluxkontextmax", "imagen3", "imagen3fast", "imagen4preview",
        "imagen4ultra", "imagen4fast", "gemini_2_5_flash_image", "hidreamfast", "hidreamdev", "hidreamfull",
        "qwen_image", "qwen_image_edit", "flex_1_alpha", "ideogram1", "ideogram2a", "ideogram2", "ideogram3",
        "sdhyper", "sd1xlcm", "sdxllcm", "sdxldistilled", "sdxlhyper", "sdxllightning", "sdxlturbo", "pony",
    ), ()),
})
