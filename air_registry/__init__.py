"""AIR model ids, the model catalog, architectures, samplers, where weights are, and (in ``loader``)
cached diffusers pipelines.

The ground floor beside ``storage``: nothing here knows the wire protocol, and failures are
:mod:`errors <imagewire.air_registry.errors>` that the task layer turns into error items. Importing
this package loads no torch or diffusers; only ``loader`` and ``tiny``, imported by the device
worker, bring in the heavy libraries.
"""

from imagewire.air_registry.air import AIR, parse_air
from imagewire.air_registry.architectures import ARCHITECTURES, Architecture
from imagewire.air_registry.catalog import Catalog, ModelDefaults, ModelEntry
from imagewire.air_registry.errors import (
    AddOnUnusable,
    CatalogError,
    MalformedAIR,
    RegistryError,
    SamplerUnusable,
    UnknownModel,
    UnknownSampler,
    WeightsMissing,
)
from imagewire.air_registry.samplers import (
    DIFFUSION,
    FLOW,
    FLOW_SAMPLERS,
    SAMPLER_NAMES,
    SAMPLERS,
    SAMPLERS_BY_SAMPLING,
    SamplerSpec,
    resolve_sampler,
)
from imagewire.air_registry.weights import availability, locate_weights

__all__ = [
    "AIR",
    "ARCHITECTURES",
    "DIFFUSION",
    "FLOW",
    "FLOW_SAMPLERS",
    "SAMPLERS",
    "SAMPLERS_BY_SAMPLING",
    "SAMPLER_NAMES",
    "AddOnUnusable",
    "Architecture",
    "Catalog",
    "CatalogError",
    "MalformedAIR",
    "ModelDefaults",
    "ModelEntry",
    "RegistryError",
    "SamplerSpec",
    "SamplerUnusable",
    "UnknownModel",
    "UnknownSampler",
    "WeightsMissing",
    "availability",
    "locate_weights",
    "parse_air",
    "resolve_sampler",
]
