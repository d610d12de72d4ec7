"""AIR model ids, the model catalog, scheduler names and (in ``loader``) cached diffusers pipelines.

Importing this package loads no torch or diffusers: the protocol layer uses it to validate
``model`` and ``scheduler``. Only ``air_registry.loader`` and ``air_registry.tiny``, imported by the
GPU worker, bring in the heavy libraries.
"""

from air_registry.air import AIR, parse_air
from air_registry.catalog import (
    Catalog,
    CatalogError,
    ModelDefaults,
    ModelEntry,
    availability,
    locate_weights,
    model_info,
)
from air_registry.schedulers import SCHEDULER_NAMES, SchedulerSpec, resolve_scheduler

__all__ = [
    "AIR",
    "SCHEDULER_NAMES",
    "Catalog",
    "CatalogError",
    "ModelDefaults",
    "ModelEntry",
    "SchedulerSpec",
    "availability",
    "locate_weights",
    "model_info",
    "parse_air",
    "resolve_scheduler",
]
