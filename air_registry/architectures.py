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
    # The kind of sampler that fits its models (``samplers.py``): checked before the device.
    sampling: str = DIFFUSION
    # The precision its weights run in on CUDA devices, as the model was trained (CPUs use float32).
    cuda_dtype: str = "float16"
    # How many tokens of the prompt the T5 encoder reads (FLUX, SD 3); None: the pipeline's default.
    max_sequence_length: int | None = None
    # The diffusers pipeline class its folders and hub repos load as; None: the one their
    # model_index.json names (so a folder of another FLUX variant's layout can run as this one).
    pipeline: str | None = None
    # Inpainting models need a mask with every image.
    inpainting_only: bool = False
    # The embedded builder whose saved model gives a single file of this architecture its configs (and
    # the components it lacks); None: diffusers finds the published configs itself (hub or its cache).
    single_file_config: str | None = None


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
                     single_file_pipeline="StableDiffusionXLImg2ImgPipeline", image_to_image_only=True),
        # Flow-matching models. FLUX.1 [schnell] is distilled to 4 steps without guidance; [dev] takes
        # FLUX's own guidance (CFGScale, see families.py) and reads twice as many T5 tokens.
        Architecture("tiny-flux", family="flux", size=256, steps=4, cfg_scale=3.5, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=64),
        Architecture("tiny-sd3", family="sd3", size=256, steps=4, cfg_scale=4.5, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=64),
        Architecture("flux1-schnell", family="flux", size=1024, steps=4, cfg_scale=0.0, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=256, single_file_pipeline="FluxPipeline"),
        Architecture("flux1-dev", family="flux", size=1024, steps=28, cfg_scale=3.5, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=512, single_file_pipeline="FluxPipeline"),
        # Kontext [dev] edits the seed image as the prompt says; Fill [dev] inpaints.
        Architecture("flux1-kontext", family="flux-kontext", size=1024, steps=28, cfg_scale=2.5, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=512, pipeline="FluxKontextPipeline"),
        Architecture("flux1-fill", family="flux", size=1024, steps=50, cfg_scale=30.0, sampling=FLOW,
                     cuda_dtype="bfloat16", max_sequence_length=512, pipeline="FluxFillPipeline",
                     inpainting_only=True),
        # SD 3 medium was released in float16; SD 3.5 in bfloat16.
        Architecture("sd3", family="sd3", size=1024, steps=28, cfg_scale=7.0, sampling=FLOW,
                     single_file_pipeline="StableDiffusion3Pipeline"),
        Architecture("sd35-medium", family="sd3", size=1024, steps=40, cfg_scale=4.5, sampling=FLOW,
                     cuda_dtype="bfloat16", single_file_pipeline="StableDiffusion3Pipeline"),
        Architecture("sd35-large", family="sd3", size=1024, steps=28, cfg_scale=3.5, sampling=FLOW,
                     cuda_dtype="bfloat16", single_file_pipeline="StableDiffusion3Pipeline"),
    )
})
