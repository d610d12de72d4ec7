"""Loading the models of the tool task types (upscalers, background removers, captioners, prompt enhancers)
and keeping the most recently used ones in memory, beside the diffusers pipelines of ``loader``.

How a model of each family is read is its runner's business (``server/engine/<task>.py`` hands ``get`` a
function); this cache finds the weights, builds embedded models, bounds what stays loaded and turns a
failed load into ``WeightsMissing``. Like ``PipelineCache`` it runs in the device worker thread only.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from imagewire.air_registry.catalog import ModelEntry
from imagewire.air_registry.errors import RegistryError, WeightsMissing
from imagewire.air_registry.tiny import ensure_embedded
from imagewire.air_registry.weights import locate_weights

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ToolModels:
    """The ``max_loaded`` most recently used tool models, by AIR id, loaded on first use."""

    def __init__(self, *, device: str, data_dir: Path, allow_downloads: bool = False, max_loaded: int = 2) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1; received {max_loaded}")
        self.device = device
        # Half precision on GPUs, as for the pipelines; CPUs have no fast float16 kernels.
        self.half = device.startswith("cuda")
        self.dtype = torch.float16 if self.half else torch.float32
        self.data_dir = Path(data_dir)
        self.allow_downloads = allow_downloads
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, Any] = OrderedDict()

    @property
    def loaded_models(self) -> list[str]:
        """AIR ids of the tool models in memory, least recently used first."""
        return list(self._loaded)

    def get(self, entry: ModelEntry, weights: Path | None, load: Callable[[Path], T]) -> T:
        """The model of ``entry``, read from ``weights`` (located here when None) by ``load`` on first use."""
        if entry.air in self._loaded:
            self._loaded.move_to_end(entry.air)
            model: T = self._loaded[entry.air]
            return model
        while len(self._loaded) >= self.max_loaded:
            evicted = next(iter(self._loaded))
            del self._loaded[evicted]
            logger.info("unloading model %s to make room for %s", evicted, entry.air)
            self._free_memory()
        if weights is None:
            weights = locate_weights(entry, data_dir=self.data_dir, allow_downloads=self.allow_downloads)
        location = "the embedded model" if entry.source == "embedded" else entry.location
        logger.info("loading model %s from %s on %s", entry.air, location, self.device)
        started = time.monotonic()
        try:
            if entry.source == "embedded":
                weights = ensure_embedded(entry.location, weights)
            model = load(weights)
        except RegistryError:
            raise
        except Exception as exc:
            # The exception (in the server log) may name local paths; the client gets its kind only.
            logger.warning("loading %s failed: %s", entry.air, exc)
            self._free_memory()
            raise WeightsMissing(
                f"the weights of {entry.label} at {location} could not be loaded ({type(exc).__name__})"
            ) from exc
        self._loaded[entry.air] = model
        logger.info("loaded model %s in %.1f s", entry.air, time.monotonic() - started)
        return model

    def unload_all(self) -> None:
        self._loaded.clear()
        self._free_memory()

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
