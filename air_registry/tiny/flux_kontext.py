"""The embedded model ``imagewire:tiny-flux-kontext@1`` (builder ``tiny-flux-kontext``): FLUX.1 Kontext [dev]
small enough to run anywhere.

Kontext [dev] has exactly FLUX.1 [dev]'s components; what makes it Kontext is its pipeline, which encodes the
images to edit (a seed image, reference images) and sets their tokens beside the image's own. So this is the
tiny FLUX's components, the same weights from the same seeds, saved as a ``FluxKontextPipeline``: its images
are noise, but they depend on the reference images through the whole of Kontext's code path.
"""

from __future__ import annotations

from pathlib import Path

from diffusers.pipelines.flux.pipeline_flux_kontext import FluxKontextPipeline

from imagewire.air_registry.tiny.flux import build_tiny_pipeline
from imagewire.air_registry.tiny.tokenizers import write_clip_vocabulary


def build(directory: Path) -> None:
    """Save the tiny Kontext pipeline in diffusers format into ``directory``."""
    flux = build_tiny_pipeline()
    # The optional image encoder of IP-Adapters stays absent (None), as in the published Kontext [dev].
    FluxKontextPipeline(**flux.components).save_pretrained(directory, safe_serialization=True)
    write_clip_vocabulary(directory / "tokenizer")
