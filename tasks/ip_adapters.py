"""imageInference's ``ipAdapters``: pictures that guide the image through IP-Adapters (SD 1.x and SDXL models).

``prepare`` checks each adapter against the model without I/O: the model's family takes IP-Adapters, each names an
IP-Adapter of the catalog made for the model's architecture, and all of them read their guide images with one
image encoder (the pipeline has one). ``job_fields`` finds their weights and decodes the guide images (any of the
four input forms) for the ``InferenceJob``. Every refusal names the adapter's field by its path
(``ipAdapters[1].model``), what would fit, and what was received; a weight out of range is refused by the decoder
(``schema.IpAdapterWeight``) with the same path.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

from imagewire.air_registry import ARCHITECTURES, ModelEntry
from imagewire.air_registry.ip_adapters import CATEGORY, image_encoder_key
from imagewire.tasks import inputs
from imagewire.tasks.context import TaskContext
from imagewire.tasks.errors import InvalidParameter, UnsupportedParameter
from imagewire.tasks.image_add_ons import fitting_add_on
from imagewire.tasks.jobs import IpAdapterUse
from imagewire.tasks.schema import ImageInference

# The families whose diffusers pipelines load IP-Adapters into a UNet (``IPAdapterMixin``). FLUX's IP-Adapters
# (XLabs', Redux) load another way and are not run here.
FAMILIES = frozenset({"sd", "sdxl"})
DEFAULT_WEIGHT = 1.0  # the docs' default


@dataclass(frozen=True)
class Chosen:
    model: ModelEntry
    weight: float
    guide: str  # as sent: decoded in ``job_fields``


def prepare(task: ImageInference, model: ModelEntry, ctx: TaskContext) -> tuple[Chosen, ...]:
    adapters = task.ipAdapters or []
    if not adapters:
        return ()
    family = ARCHITECTURES[model.architecture].family
    if family not in FAMILIES:
        fitting = [architecture.name for architecture in ARCHITECTURES.values()
                   if architecture.family in FAMILIES and architecture.task == "imageInference"]
        raise UnsupportedParameter(
            f"ipAdapters is not supported for model {model.air} ({model.architecture}, {family} family): IP-Adapters "
            f"apply to models of the SD 1.x and SDXL families (architectures {', '.join(fitting)}); FLUX's "
            "IP-Adapters (FLUX Redux, runware:105@1) are not run by this server. Remove ipAdapters from the request.",
            parameter="ipAdapters", allowed_values=fitting)
    chosen: list[Chosen] = []
    for index, adapter in enumerate(adapters):
        parameter = f"ipAdapters[{index}].model"
        entry = fitting_add_on(ctx, adapter.model, model, parameter=parameter, category=CATEGORY)
        if chosen and image_encoder_key(entry) != image_encoder_key(chosen[0].model):
            same = [other.air for other in ctx.services.catalog.entries
                    if other.category == CATEGORY and other.architecture == entry.architecture
                    and image_encoder_key(other) == image_encoder_key(chosen[0].model)]
            raise InvalidParameter(
                f"{parameter} {entry.air} reads its guide image with another image encoder than ipAdapters[0].model "
                f"{chosen[0].model.air}, and the IP-Adapters of one request share one. IP-Adapters that share "
                f"{chosen[0].model.air}'s: {', '.join(same[:10])}.", parameter=parameter, type="string",
                allowed_values=same[:100])
        weight = DEFAULT_WEIGHT if adapter.weight is None else adapter.weight
        chosen.append(Chosen(entry, weight, adapter.guideImage))
    return tuple(chosen)


async def job_fields(chosen: tuple[Chosen, ...], ctx: TaskContext) -> dict[str, Any]:
    """The ``InferenceJob``'s ``ip_adapters``: each one's weights found and its guide image decoded."""
    if not chosen:
        return {}

    async def located(index: int, adapter: Chosen) -> IpAdapterUse:
        weights, guide = await asyncio.gather(
            inputs.weights(ctx, adapter.model, parameter=f"ipAdapters[{index}].model"),
            inputs.image(ctx, adapter.guide, parameter=f"ipAdapters[{index}].guideImage"))
        picture = guide.image.convert("RGB")
        digest = hashlib.blake2b(picture.tobytes(), digest_size=16)
        digest.update(repr(picture.size).encode())
        return IpAdapterUse(adapter.model, weights, adapter.weight, picture, digest.hexdigest())

    return {"ip_adapters": tuple(await asyncio.gather(*(located(i, a) for i, a in enumerate(chosen))))}
