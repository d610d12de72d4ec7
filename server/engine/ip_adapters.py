"""IP-Adapters on a pipeline for one run of jobs (their batch key holds the adapters, weights and guide images).

Loaded through diffusers' own IP-Adapter loading (``load_ip_adapter`` with the adapters' state dicts, then
``set_ip_adapter_scale`` with their weights), with the image encoder the adapters share set on the pipeline first
so that diffusers reads nothing from the hub. The adapters' tensors and the image encoder stay loaded beside the
pipelines (``PipelineCache.ip_adapter``, ``image_encoder``); what loading changes in the model (the UNet's attention
processors and its image projection, the pipeline's image encoder and feature extractor) is put back as it was when
the run ends, failed or not: the cached pipeline serves the next job, with or without IP-Adapters, unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from transformers import CLIPImageProcessor

from imagewire.air_registry import RegistryError
from imagewire.tasks.inputs import task_error
from imagewire.tasks.jobs import InferenceJob

if TYPE_CHECKING:
    from imagewire.server.engine import DiffusersEngine


@contextlib.contextmanager
def applied(engine: DiffusersEngine, pipe: Any, job: InferenceJob) -> Iterator[dict[str, Any]]:
    """``job``'s IP-Adapters on ``pipe`` while the block runs; yields the pipeline call's extra arguments."""
    adapters = job.ip_adapters
    if not adapters:
        yield {}
        return
    pipelines, unet = engine.pipelines, pipe.unet
    state_dicts = []
    encoder_folder = None
    for index, adapter in enumerate(adapters):
        try:
            parts, encoder_folder = pipelines.ip_adapter(adapter.model, adapter.weights)
        except RegistryError as exc:
            raise task_error(exc, f"ipAdapters[{index}].model") from exc
        state_dicts.append(parts)
    assert encoder_folder is not None
    try:
        # The adapters share one image encoder (checked with the request).
        encoder = pipelines.image_encoder(adapters[0].model, encoder_folder, unet.dtype)
    except RegistryError as exc:
        raise task_error(exc, "ipAdapters[0].model") from exc
    side = encoder.config.image_size
    # A pipeline read from a single file may lack the optional components: absent counts as None.
    saved = (getattr(pipe, "image_encoder", None), getattr(pipe, "feature_extractor", None), unet.attn_processors,
             unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)
    try:
        pipe.register_modules(image_encoder=encoder,
                              feature_extractor=CLIPImageProcessor(size=side, crop_size=side))
        # State dicts: nothing is looked up by name, so the subfolders and file names are not read.
        pipe.load_ip_adapter(state_dicts, subfolder=[""] * len(adapters), weight_name=[""] * len(adapters))
        pipe.set_ip_adapter_scale([adapter.weight for adapter in adapters])
        yield {"ip_adapter_image": [adapter.guide for adapter in adapters]}
    finally:
        image_encoder, feature_extractor, processors, projection, hid_type = saved
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = projection
        unet.config.encoder_hid_dim_type = hid_type
        pipe.register_modules(image_encoder=image_encoder, feature_extractor=feature_extractor)
