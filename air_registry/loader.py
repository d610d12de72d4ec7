"""Loading diffusers pipelines for catalog entries and keeping the most recently used ones in memory.

Loading a model is the most expensive thing the server does, so the cache keeps the ``max_loaded`` most
recently used models on the device, and the ``ram_models`` used before those in host RAM: switching back
to one of those is a copy to the device rather than a read from disk. A job that needs two models at once
(an SDXL model and its refiner) pins the first while the second loads. Each loaded model carries its
add-ons (``add_ons.py``: LoRAs, embeddings, VAEs), which go where it goes.

Everything here runs in the server's GPU worker thread, one call at a time: diffusers pipelines
hold sampler state and are not safe to share between threads, so the cache takes no locks.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import inspect
import json
import logging
import os
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

# Imported from their own modules rather than from ``diffusers``: the package's lazy top level shows
# type checkers placeholder classes without methods.
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.pipelines.auto_pipeline import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.import_utils import DummyObject

from imagewire.air_registry.add_ons import ModelAddOns, WeightedModel
from imagewire.air_registry.architectures import ARCHITECTURES
from imagewire.air_registry.catalog import ModelEntry
from imagewire.air_registry.checkpoints import tensor_shapes, weights_format
from imagewire.air_registry.compile import compile_denoiser, uncompile_denoiser, warm_up
from imagewire.air_registry.errors import AddOnUnusable, RegistryError, SamplerUnusable, WeightsMissing
from imagewire.air_registry.flux_files import NotAFluxTransformer, read_flux_transformer
from imagewire.air_registry.memory_plan import (
    ALL_ON_DEVICE,
    MODEL_OFFLOAD,
    SEQUENTIAL_OFFLOAD,
    TEXT_ENCODER,
    TEXT_ENCODERS_ON_CPU,
    Activations,
    MemoryPlan,
    ModelSize,
    ModelTooLarge,
    plan_placement,
    read_sizes,
    role_of,
)
from imagewire.air_registry.model_files import COMPONENT_CONFIG, MODEL_INDEX
from imagewire.air_registry.pipeline_configs import PIPELINE_CONFIGS
from imagewire.air_registry.quantize import check_quantization, quantize_pipeline
from imagewire.air_registry.quantized import QUANTIZE_MODES, is_gguf, is_scaled_float8, require_gguf
from imagewire.air_registry.samplers import FLOW, FLOW_SAMPLERS, SAMPLERS, SamplerSpec
from imagewire.air_registry.single_file import (
    CONTROLNET_SUBFOLDER,
    config_folder,
    controlnet_config_folder,
    controlnet_guide_channels,
    find_pieces,
    missing_components,
    missing_pieces_message,
)
from imagewire.air_registry.tiny import ensure_embedded
from imagewire.air_registry.weights import locate_weights

logger = logging.getLogger(__name__)

_CUDA_DEVICE = re.compile(r"cuda(:\d+)?")


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` are checked.

    Raises ``ValueError``: a wrong device is the operator's mistake, found at start-up.
    """
    device = name.strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if _CUDA_DEVICE.fullmatch(device) is None:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; received {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but this machine has no usable CUDA device")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device {name!r} does not exist: this machine has {count} CUDA device(s)")
    return device


# What the image encoders of IP-Adapters are kept under beside the components, which are kept by AIR.
_IMAGE_ENCODER_KEY = "image-encoder:"

# DPMSolverSDEScheduler draws its noise from a Brownian tree with its own seed (one per image),
# not from the pipeline's generator; left unset it is random.
_NOISE_SEED_OPTION = "noise_sampler_seed"

# Newer diffusers call the loading argument ``dtype`` and warn about ``torch_dtype``, which is the only
# name older versions know.
_DTYPE_KEYWORD = "dtype" if hasattr(diffusers.utils, "_resolve_dtype") else "torch_dtype"


@dataclass
class _LoadedModel:
    # What was loaded: a text-to-image pipeline, or for image-to-image-only models, that pipeline.
    primary: DiffusionPipeline
    # The model's own sampler as loaded. Callers swap ``pipe.scheduler`` per call, so this is the
    # only reliable record of what "Default" means and of the config other samplers start from.
    sampler_class: Any
    sampler_config: Any
    image_to_image: DiffusionPipeline | None = None
    inpainting: DiffusionPipeline | None = None
    # Pipelines made from this model's for one call (with ControlNets), while they are in use.
    derived: weakref.WeakSet[DiffusionPipeline] = field(default_factory=weakref.WeakSet)
    add_ons: ModelAddOns | None = None  # made on first use
    plan: MemoryPlan | None = None      # where its weights live (``memory_plan.py``); None: all on the device
    size: ModelSize | None = None       # its weights by component, as its plan was made from

    def owns(self, pipe: DiffusionPipeline) -> bool:
        return pipe is self.primary or pipe is self.image_to_image or pipe is self.inpainting or pipe in self.derived

    @property
    def pipes(self) -> list[DiffusionPipeline]:
        """Its pipelines, the primary first: add-ons that replace a component (a VAE, tokenizers) go on each."""
        return [pipe for pipe in (self.primary, self.image_to_image, self.inpainting, *self.derived)
                if pipe is not None]

    def to(self, device: str) -> None:
        # image_to_image shares the primary's modules: moving the primary moves both.
        placement = self.plan.placement if self.plan is not None else ALL_ON_DEVICE
        if placement == ALL_ON_DEVICE:
            self.primary.to(device)
        elif placement == TEXT_ENCODERS_ON_CPU:
            # The text encoders stay in host RAM whatever happens; the rest goes where the model goes.
            for name, module in _modules(self.primary):
                if role_of(name) != TEXT_ENCODER:
                    module.to(device)
        # Offloaded models wait in host RAM between calls already: nothing to move.
        if self.add_ons is not None and placement in (ALL_ON_DEVICE, TEXT_ENCODERS_ON_CPU):
            self.add_ons.to(device)


def unavailable_samplers() -> dict[str, str]:
    """Samplers this installation cannot run, by name, each with why: a class missing from the installed
    diffusers, or one that needs an optional package (diffusers then exports a placeholder). Checked once
    at start, so that requests for them are refused before they reach the device."""
    unavailable: dict[str, str] = {}
    for name, spec in [*SAMPLERS.items(), *FLOW_SAMPLERS.items()]:
        sampler_class = getattr(diffusers, spec.class_name, None)
        if sampler_class is None:
            unavailable[name] = f"is not available in this server's diffusers {diffusers.__version__}"
        elif isinstance(sampler_class, DummyObject):
            needs = ", ".join(getattr(sampler_class, "_backends", ())) or "an optional package"
            unavailable[name] = f"needs {needs}, which is not installed on this server"
    return unavailable


class PipelineCache:
    """Pipelines of the ``max_loaded`` most recently used models on the device, loaded on first use, and of
    the ``ram_models`` used before them in host RAM."""

    def __init__(
        self, *, device: str, data_dir: Path, allow_downloads: bool = False, max_loaded: int = 1,
        ram_models: int = 0, max_components: int = 5, memory_budget: int | None = None, max_batch_size: int = 1,
        quantize: str = "none", compile_denoisers: bool = False,
    ) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1; received {max_loaded}")
        if ram_models < 0:
            raise ValueError(f"ram_models must be at least 0; received {ram_models}")
        self.device = device
        self.data_dir = Path(data_dir)
        self.allow_downloads = allow_downloads
        self.max_loaded = max_loaded
        self.ram_models = ram_models
        self._loaded: OrderedDict[str, _LoadedModel] = OrderedDict()   # on the device, least recent first
        self._in_ram: OrderedDict[str, _LoadedModel] = OrderedDict()   # in host RAM, least recent first
        # Single models used beside a pipeline (ControlNets, safety checkers), most recently used last.
        self.max_components = max_components
        self._components: OrderedDict[str, Any] = OrderedDict()
        # Bytes the device may hold for models and their calls (None: no limit), and the largest batch a call
        # makes: what each model's memory plan is made for.
        self.memory_budget = memory_budget
        self.max_batch_size = max_batch_size
        # Weight-only quantization on load of the transformer models whose catalog entries do not choose
        # (``quantize.py``).
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}; received {quantize!r}")
        self.quantize = quantize
        # Regional compilation of the denoisers whose catalog entries do not choose (``compile.py``).
        self.compile_denoisers = compile_denoisers

    def dtype_of(self, entry: ModelEntry) -> torch.dtype:
        """The precision ``entry`` runs in here: its architecture's on CUDA (half precision halves memory
        and doubles speed, in the half format the model was trained in), float32 on CPUs, which have no
        fast half-precision kernels."""
        if not self.device.startswith("cuda"):
            return torch.float32
        dtype: torch.dtype = getattr(torch, ARCHITECTURES[entry.architecture].cuda_dtype)
        return dtype

    def quantization_of(self, entry: ModelEntry) -> str:
        """How ``entry``'s transformer and T5 are quantized on load: as its catalog entry says, else as the server's
        --quantize; never a UNet model's (its weights are mostly convolutions) nor a GGUF file's (quantized
        already)."""
        mode = entry.quantize or self.quantize
        if ARCHITECTURES[entry.architecture].sampling != FLOW or is_gguf(Path(entry.location)):
            return "none"
        return mode

    def compiles(self, entry: ModelEntry) -> bool:
        """Whether ``entry``'s denoiser is compiled on load: as its catalog entry says, else as --compile."""
        return self.compile_denoisers if entry.compile is None else entry.compile

    @property
    def loaded_models(self) -> list[str]:
        """AIR ids of the models on the device, least recently used first."""
        return list(self._loaded)

    @property
    def plans(self) -> dict[str, MemoryPlan]:
        """The memory plan of each model in memory (on the device or in host RAM), by AIR."""
        return {air: loaded.plan for models in (self._in_ram, self._loaded) for air, loaded in models.items()
                if loaded.plan is not None}

    def decode_headroom(self, entry: ModelEntry) -> int | None:
        """Bytes a call of the (loaded) model may use beside the weights on the device (None: no limit)."""
        loaded = self._loaded.get(entry.air)
        if self.memory_budget is None or loaded is None or loaded.plan is None:
            return None
        others = sum(model.plan.resident_bytes for air, model in self._loaded.items()
                     if air != entry.air and model.plan is not None)
        return max(0, (loaded.plan.headroom or 0) - others)

    def plan(self, entry: ModelEntry, weights: Path, *, held: int = 0) -> MemoryPlan:
        """Where ``entry``'s weights (at ``weights``) will live, decided from their sizes before they load, for
        the budget less ``held`` bytes of other models. Raises ``ModelTooLarge`` when no placement fits."""
        size, saved = self._size(entry, weights)
        budget = None if self.memory_budget is None else max(0, self.memory_budget - held)
        plan = plan_placement(size, budget=budget, activations=self._activations(entry, size),
                              device=self.device, label=entry.label)
        return dataclasses.replace(plan, quantization=self.quantization_of(entry), saved_bytes=saved)

    def _size(self, entry: ModelEntry, weights: Path) -> tuple[ModelSize, int]:
        """``entry``'s weights as they will load, and what quantization saves against its precision (logged with
        the plan)."""
        dtype_bytes = torch.finfo(self.dtype_of(entry)).bits // 8
        quantization = self.quantization_of(entry)
        size = read_sizes(weights, dtype_bytes, quantization) or ModelSize(())
        saved = (read_sizes(weights, dtype_bytes) or size).total - size.total if quantization != "none" else 0
        return size, saved

    def _activations(self, entry: ModelEntry, size: ModelSize) -> int:
        """What the largest call of ``entry`` holds beside its weights."""
        flux = ARCHITECTURES[entry.architecture].family == "flux"
        # Guidance-distilled FLUX runs one latent per image; the others two with classifier-free guidance.
        activations = Activations(batch=self.max_batch_size, width=entry.defaults.width,
                                  height=entry.defaults.height,
                                  dtype_bytes=torch.finfo(self.dtype_of(entry)).bits // 8, copies=1 if flux else 2)
        return activations.total(size.denoiser_kind)

    def _plan_together(self, entry: ModelEntry, weights: Path, kept: Sequence[str]) -> MemoryPlan:
        """A job needs ``entry`` beside models it keeps on the device (an SDXL model, then its refiner), and
        ``entry`` fits in no placement beside them as they are placed. Plan them as one, since the job runs them
        one after the other: the fastest placement that fits the pair (``ModelSize.of_models``) is given to
        each, the kept ones placed again by it, and ``entry`` loads by it. Each must have the same: one left
        on the device whole would leave the other's calls too little. Raises ``ModelTooLarge`` when they do not
        fit together either, or when a kept model is offloaded already (placed again only from the device)."""
        models = [self._loaded[air] for air in kept]
        size, saved = self._size(entry, weights)
        if any(model.size is None or model.plan is None or model.plan.placement in (MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD)
               for model in models):
            raise ModelTooLarge(f"{entry.label} does not fit beside the models its task needs at once")
        assert self.memory_budget is not None
        budget = max(0, self.memory_budget - self.resident_bytes(besides=kept))
        activations = max(self._activations(entry, size), *(model.plan.activation_bytes for model in models
                                                              if model.plan is not None))
        together = ModelSize.of_models([*(model.size for model in models if model.size is not None), size])
        label = " and ".join([*kept, entry.air]) + " together"
        joint = plan_placement(together, budget=budget, activations=activations, device=self.device, label=label)
        logger.info("planned %s: %s", label, joint.describe())
        only = (joint.placement,)
        for air, model in zip(kept, models, strict=True):
            assert model.size is not None and model.plan is not None
            if model.plan.placement != joint.placement:
                logger.info("placing model %s again as %s, so that %s fits beside it", air, joint.placement,
                            entry.air)
                unplace(model.primary)
                place(model.primary, joint.placement, self.device)
                if model.add_ons is not None and joint.placement == TEXT_ENCODERS_ON_CPU:
                    model.add_ons.to(self.device)
                model.plan = dataclasses.replace(
                    plan_placement(model.size, budget=budget, activations=activations, device=self.device,
                                   allowed=only, label=air),
                    quantization=model.plan.quantization, saved_bytes=model.plan.saved_bytes)
        plan = plan_placement(size, budget=budget, activations=activations, device=self.device, allowed=only,
                              label=entry.label)
        return dataclasses.replace(plan, quantization=self.quantization_of(entry), saved_bytes=saved)

    def resident_bytes(self, *, besides: Collection[str] = ()) -> int:
        """Bytes of weights the models on the device keep there between calls, but those in ``besides``."""
        return sum(loaded.plan.resident_bytes for air, loaded in self._loaded.items()
                   if air not in besides and loaded.plan is not None)

    @property
    def memory(self) -> dict[str, str]:
        """Where each model in memory is, ``"device"`` or ``"ram"``, with the add-ons loaded into it and the
        single models used beside the pipelines (ControlNets, safety checkers: on the device)."""
        # Image encoders are kept by folder, not AIR: their adapters' entries stand for them.
        where: dict[str, str] = dict.fromkeys(
            (key for key in self._components if not key.startswith(_IMAGE_ENCODER_KEY)), "device")
        for place, models in (("ram", self._in_ram), ("device", self._loaded)):
            for air, loaded in models.items():
                where[air] = place
                for add_on in loaded.add_ons.loaded if loaded.add_ons else ():
                    # An add-on loaded into several models is as near as its nearest one.
                    where[add_on] = "device" if "device" in (place, where.get(add_on)) else place
        return where

    def load(self, entry: ModelEntry, weights: Path | None = None) -> DiffusionPipeline:
        """The pipeline the model loads as (text-to-image, or its only one): to have it in memory."""
        return self._get(entry, weights).primary

    def text_to_image(self, entry: ModelEntry, weights: Path | None = None, *,
                      keep: Collection[str] = ()) -> DiffusionPipeline:
        """The model's text-to-image pipeline, loaded from ``weights`` (located here when None). Models named
        in ``keep`` stay on the device meanwhile (the job needs them too)."""
        architecture = ARCHITECTURES[entry.architecture]
        if architecture.image_to_image_only or architecture.inpainting_only:
            # Requests are validated before they get here; this is a caller's bug.
            raise ValueError(f"model {entry.air} only does image-to-image")
        return self._get(entry, weights, keep).primary

    def image_to_image(self, entry: ModelEntry, weights: Path | None = None, *,
                       keep: Collection[str] = ()) -> DiffusionPipeline:
        loaded = self._get(entry, weights, keep)
        if ARCHITECTURES[entry.architecture].image_to_image_only:
            return loaded.primary
        if loaded.image_to_image is None:
            loaded.image_to_image = _view(AutoPipelineForImage2Image, loaded.primary)
        return loaded.image_to_image

    def inpainting(self, entry: ModelEntry, weights: Path | None = None, *,
                   keep: Collection[str] = ()) -> DiffusionPipeline:
        """The model's inpainting pipeline: an inpainting checkpoint's own, or a view on any other's weights."""
        loaded = self._get(entry, weights, keep)
        if ARCHITECTURES[entry.architecture].inpainting_only:
            return loaded.primary
        if loaded.inpainting is None:
            loaded.inpainting = _view(AutoPipelineForInpainting, loaded.primary)
        return loaded.inpainting

    def with_controlnet(self, pipe: DiffusionPipeline, controlnet: Any) -> DiffusionPipeline:
        """``pipe`` (text-to-image, image-to-image or inpainting) with ``controlnet`` in it: a view on the
        same loaded modules, for one call. ``controlnet`` is one ControlNet model or a multi-ControlNet."""
        mapping = AutoPipelineForInpainting if hasattr(pipe, "mask_processor") else (
            AutoPipelineForImage2Image if _takes_strength(pipe) else AutoPipelineForText2Image)
        derived: DiffusionPipeline = mapping.from_pipe(pipe, controlnet=controlnet)
        derived.set_progress_bar_config(disable=True)
        for loaded in self._loaded.values():
            if loaded.owns(pipe):
                loaded.derived.add(derived)
        return derived

    def controlnet(self, entry: ModelEntry, weights: Path | None = None) -> ControlNetModel:
        """A ControlNet model, on the device in the pipelines' precision."""

        def read(path: Path) -> Any:
            if entry.source == "single_file":
                options: dict[str, Any] = {_DTYPE_KEYWORD: self.dtype_of(entry)}
                # The config of a ControlNet for the model it fits, written here: nothing from the hub. The
                # architectures whose single files read an embedded model's configs take its UNet's.
                configs = self.data_dir / "models" / "configs"
                builder = ARCHITECTURES[entry.architecture].single_file_config
                unet = None
                if builder is not None:
                    unet = json.loads((ensure_embedded(builder, configs / builder) / "unet" / COMPONENT_CONFIG)
                                      .read_text())
                # A pickled file's shapes cannot be read without unpickling it: taken to have the usual widths.
                guide = (controlnet_guide_channels(tensor_shapes(path)) if path.suffix.lower() == ".safetensors"
                         else None)
                folder = controlnet_config_folder(entry.architecture, configs, unet=unet, guide_channels=guide)
                if folder is not None:
                    options.update(config=str(folder), subfolder=CONTROLNET_SUBFOLDER, local_files_only=True)
                return ControlNetModel.from_single_file(str(path), **options)
            return ControlNetModel.from_pretrained(str(path), **self._options(entry))

        model: ControlNetModel = self._component(entry, weights, read)
        return model

    def safety_checker(self, entry: ModelEntry, weights: Path | None = None) -> tuple[Any, Any]:
        """The safety checker diffusers' pipelines use, and the image processor that feeds it."""

        def read(path: Path) -> Any:
            # Imported here: only servers that check content need them.
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

            from imagewire.air_registry.tiny.safety import image_processor_class

            checker: Any = StableDiffusionSafetyChecker.from_pretrained(str(path))
            return checker.to(dtype=self.dtype_of(entry)).eval(), image_processor_class().from_pretrained(str(path))

        checker, processor = self._component(entry, weights, read)
        return checker, processor

    def ip_adapter(self, entry: ModelEntry, weights: Path | None = None) -> tuple[dict[str, Any], Path]:
        """An IP-Adapter's tensors, as diffusers' ``load_ip_adapter`` takes a state dict (``image_proj`` and
        ``ip_adapter`` parts, in host RAM: loading puts them in the UNet), and its image encoder's folder."""

        def read(path: Path) -> tuple[dict[str, Any], Path]:
            from safetensors.torch import load_file

            from imagewire.air_registry.ip_adapters import adapter_files

            file, encoder = adapter_files(path)
            tensors = load_file(str(file))
            parts: dict[str, Any] = {"image_proj": {}, "ip_adapter": {}}
            for key, tensor in tensors.items():
                part, _, name = key.partition(".")
                if part in parts:
                    parts[part][name] = tensor
            if not parts["image_proj"] or not parts["ip_adapter"]:
                raise AddOnUnusable(f"{entry.label} holds no image_proj.* and ip_adapter.* tensors: it is not an "
                                    "IP-Adapter's weights file", air=entry.air)
            return parts, encoder

        adapter: tuple[dict[str, Any], Path] = self._component(entry, weights, read)
        return adapter

    def image_encoder(self, adapter: ModelEntry, folder: Path, dtype: torch.dtype) -> Any:
        """The CLIP image encoder in ``folder`` (``adapter``'s), on the device in ``dtype``: loaded once for every
        adapter that reads with it."""
        key = f"{_IMAGE_ENCODER_KEY}{folder}:{dtype}"
        found = self._components.get(key)
        if found is not None:
            self._components.move_to_end(key)
            return found
        if not (folder / "config.json").is_file():
            raise AddOnUnusable(f"the image encoder of {adapter.label} is not on this server: {folder} holds no "
                                "config.json (an IP-Adapter's image encoder comes with it, see modelSearch for the "
                                "download command)", air=adapter.air)
        self._make_room_for_component(key)
        try:
            encoder: Any = transformers.CLIPVisionModelWithProjection.from_pretrained(str(folder), dtype=dtype)
        except Exception as exc:
            self._free_memory()
            raise AddOnUnusable(f"the image encoder of {adapter.label} at {folder} could not be loaded "
                                f"({type(exc).__name__})", air=adapter.air) from exc
        encoder = encoder.to(self.device).eval()
        self._components[key] = encoder
        return encoder

    def _make_room_for_component(self, key: str) -> None:
        while len(self._components) >= self.max_components:
            evicted = next(iter(self._components))
            del self._components[evicted]
            logger.info("unloading %s to make room for %s", evicted, key)
            self._free_memory()

    def _component(self, entry: ModelEntry, weights: Path | None, read: Any) -> Any:
        found = self._components.get(entry.air)
        if found is not None:
            self._components.move_to_end(entry.air)
            return found
        self._make_room_for_component(entry.air)
        if weights is None:
            weights = locate_weights(entry, data_dir=self.data_dir, allow_downloads=self.allow_downloads)
        location = "the embedded model" if entry.source == "embedded" else entry.location
        logger.info("loading %s %s from %s on %s", entry.category, entry.air, location, self.device)
        started = time.monotonic()
        _enable_loading_progress_bars()
        try:
            if entry.source == "embedded":
                weights = ensure_embedded(entry.location, weights)
            loaded = read(weights)
            for module in loaded if isinstance(loaded, tuple) else (loaded,):
                if isinstance(module, torch.nn.Module):
                    module.to(self.device)
        except RegistryError:
            raise
        except Exception as exc:
            self._free_memory()
            raise WeightsMissing(
                f"the weights of {entry.label} at {location} could not be loaded ({type(exc).__name__})"
            ) from exc
        logger.info("loaded %s in %.1f s", entry.air, time.monotonic() - started)
        self._components[entry.air] = loaded
        return loaded

    def make_sampler(
        self, pipe: DiffusionPipeline, spec: SamplerSpec | None, *, seeds: Sequence[int] = ()
    ) -> SchedulerMixin:
        """A new sampler for one call of ``pipe``; the caller sets it as ``pipe.scheduler``.

        Samplers keep per-run state, so none is ever reused. Every sampler starts from the config
        of the model's own sampler, never from whatever an earlier call left in ``pipe.scheduler``.
        ``seeds`` (one per image of the call) seed the samplers that draw noise from their own
        source rather than from the pipeline's generator, so that their results repeat by seed too.
        """
        model_sampler_class, model_config = self._model_sampler(pipe)
        if spec is None:
            return model_sampler_class.from_config(model_config, **_seed_option(model_sampler_class, seeds))
        sampler_class = getattr(diffusers, spec.class_name)
        options = {**spec.options, **_seed_option(sampler_class, seeds)}
        try:
            return sampler_class.from_config(model_config, **options)
        except (ValueError, NotImplementedError) as exc:
            # The model's config can rule some out (a prediction type a solver lacks).
            raise SamplerUnusable(
                f"{spec.name} cannot be used with this model ({type(exc).__name__}); choose another scheduler"
            ) from exc

    def _model_sampler(self, pipe: DiffusionPipeline) -> tuple[Any, Any]:
        for loaded in self._loaded.values():
            if loaded.owns(pipe):
                return loaded.sampler_class, loaded.sampler_config
        # A pipeline this cache did not load: its current sampler is the best record there is.
        current: Any = pipe.scheduler
        return type(current), current.config

    def use_add_ons(self, entry: ModelEntry, *, loras: Sequence[WeightedModel] = (),
                    embeddings: Sequence[WeightedModel] = (), vae: WeightedModel | None = None) -> None:
        """Make the next call of the (loaded) model's pipelines use these add-ons, and no others."""
        loaded = self._loaded[entry.air]
        if loaded.add_ons is None:
            if not (loras or embeddings or vae):
                return  # nothing was ever added: nothing to take off
            loaded.add_ons = ModelAddOns(loaded.primary, allow_downloads=self.allow_downloads)
        loaded.add_ons.use(loaded.pipes, loras=loras, embeddings=embeddings, vae=vae)
        if loaded.plan is not None and loaded.plan.placement in (MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD):
            # A VAE swapped in has none of the offload hooks, which would leave it in host RAM while its latents
            # are on the device. VAEs are small (about 160 MB): it stays on the device while it is in use.
            for pipe in loaded.pipes:
                if pipe.vae is not None and not _hooked(pipe.vae):
                    pipe.vae.to(self.device)

    def unload_all(self) -> None:
        self._loaded.clear()
        self._in_ram.clear()
        self._components.clear()
        self._free_memory()

    # ---------------------------------------------------------------- loading

    def _get(self, entry: ModelEntry, weights: Path | None, keep: Collection[str] = ()) -> _LoadedModel:
        loaded = self._loaded.get(entry.air)
        if loaded is not None:
            self._loaded.move_to_end(entry.air)
            return loaded
        # Taken out of RAM first, so that making room does not push it out of memory.
        kept = self._in_ram.pop(entry.air, None)
        plan = kept.plan if kept is not None else None
        if kept is None:
            weights = self._weights(entry, weights)
            plan = self.plan(entry, weights)  # alone on the device: the fastest placement it can have
        # Make room before loading, so that two models never have to fit on the device at once.
        self._make_room(entry, keep, plan)
        if kept is not None:
            started = time.monotonic()
            kept.to(self.device)
            self._loaded[entry.air] = kept
            logger.info("moved model %s from host RAM to %s in %.2f s", entry.air, self.device,
                        time.monotonic() - started)
            return kept
        # Planned again beside what stayed: the models this job keeps may leave less than the budget.
        assert weights is not None
        try:
            plan = self.plan(entry, weights, held=self.resident_bytes())
        except ModelTooLarge:
            beside = [air for air in self._loaded if air in keep]
            if not beside:
                raise
            plan = self._plan_together(entry, weights, beside)
        pipe = self._load(entry, weights, plan)
        sampler: Any = pipe.scheduler
        loaded = _LoadedModel(primary=pipe, sampler_class=type(sampler), sampler_config=sampler.config, plan=plan,
                              size=self._size(entry, weights)[0])
        self._loaded[entry.air] = loaded
        return loaded

    def _weights(self, entry: ModelEntry, weights: Path | None) -> Path:
        if weights is None:
            weights = locate_weights(entry, data_dir=self.data_dir, allow_downloads=self.allow_downloads)
        if entry.source == "embedded":
            weights = ensure_embedded(entry.location, weights)
        return weights

    def _fits(self, plan: MemoryPlan | None) -> bool:
        """Whether ``plan``'s call fits beside the weights the models on the device keep there."""
        if plan is None or plan.budget_bytes is None:
            return True
        return self.resident_bytes() + plan.peak_bytes <= plan.budget_bytes

    def _make_room(self, entry: ModelEntry, keep: Collection[str], plan: MemoryPlan | None = None) -> None:
        """Evict the least recently used models not in ``keep`` until one more fits, by count
        (``max_loaded``) and by memory (the weights they keep on the device beside ``plan``'s peak): to host
        RAM while it has room (the least recent of those leaving memory), else out of memory. Models that fit
        together stay together; a model that needs offloading has the others leave first."""
        while len(self._loaded) >= self.max_loaded or not self._fits(plan):
            evicted = next((air for air in self._loaded if air not in keep), None)
            if evicted is None:
                return  # every loaded model is needed by this job: hold one more for as long as it runs
            moved = self._loaded.pop(evicted)
            dropped = False
            if self.ram_models > 0:
                moved.to("cpu")
                self._in_ram[evicted] = moved
                logger.info("moved model %s to host RAM to make room for %s", evicted, entry.air)
                while len(self._in_ram) > self.ram_models:
                    oldest = next(iter(self._in_ram))
                    del self._in_ram[oldest]
                    dropped = True
                    logger.info("unloading model %s from host RAM", oldest)
            else:
                dropped = True
                logger.info("unloading model %s to make room for %s", evicted, entry.air)
            # Deleted by key above, so that no local variable keeps evicted pipelines alive during gc.
            del moved
            if dropped:
                self._free_memory()
            elif self.device.startswith("cuda"):
                # Moved, not dropped: its tensors left the device, nothing for the (slow) collector to find.
                torch.cuda.empty_cache()

    def _load(self, entry: ModelEntry, weights: Path, plan: MemoryPlan) -> DiffusionPipeline:
        location = "the embedded model" if entry.source == "embedded" else entry.location
        logger.info("loading model %s from %s on %s: %s", entry.air, location, self.device, plan.describe())
        started = time.monotonic()
        _enable_loading_progress_bars()
        if plan.quantization != "none":
            # Before the weights are read: a server that cannot quantize says so at once.
            check_quantization(plan.quantization, device=self.device, dtype=self.dtype_of(entry), what=entry.label)
        try:
            pipe = self._read_pipeline(entry, weights)
            if plan.quantization != "none":
                quantized = quantize_pipeline(pipe, plan.quantization)
                logger.info("quantized %s of %s to %s, weight-only", " and ".join(quantized) or "nothing",
                            entry.air, plan.quantization)
            place(pipe, plan.placement, self.device)
            if self.compiles(entry):
                self._compile(entry, pipe, plan)
        except RegistryError:
            raise
        except Exception as exc:
            # Whatever was loaded before the failure is garbage now; give its memory back at once.
            self._free_memory()
            raise WeightsMissing(
                f"the weights of {entry.label} at {location} could not be loaded ({type(exc).__name__})"
            ) from exc
        # Per-step progress bars are noise in a server log; the server reports progress itself.
        pipe.set_progress_bar_config(disable=True)
        logger.info("loaded model %s in %.1f s", entry.air, time.monotonic() - started)
        return pipe

    def _compile(self, entry: ModelEntry, pipe: DiffusionPipeline, plan: MemoryPlan) -> None:
        """Compile the denoiser's repeated blocks and warm them up, or say why it runs eagerly."""
        if plan.placement == SEQUENTIAL_OFFLOAD:
            # Each layer is moved to the device as it runs: hooks inside the blocks, which a graph cannot hold.
            logger.warning("not compiling %s: its plan moves each layer to the device as it runs", entry.air)
            return
        pipe.set_progress_bar_config(disable=True)
        try:
            blocks = compile_denoiser(pipe)
            logger.info("compiling %d repeated blocks of %s; the warm-up runs before it is ready", blocks, entry.air)
            architecture = ARCHITECTURES[entry.architecture]
            views = [pipe] if architecture.image_to_image_only or architecture.inpainting_only else [
                pipe, _view(AutoPipelineForImage2Image, pipe)]
            for view in views:
                warm_up(view, width=entry.defaults.width, height=entry.defaults.height,
                        max_batch_size=self.max_batch_size, device=self.device)
        except Exception as exc:  # noqa: BLE001 - an eager model serves as well, only slower
            uncompile_denoiser(pipe)
            logger.debug("the compiler's failure on %s", entry.air, exc_info=True)
            # Its first lines say what failed ("backend='inductor' raised:", then the cause); the rest is a trace.
            said = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:300]
            logger.warning("not compiling %s: the compiler failed (%s: %s); it runs eagerly", entry.air,
                           type(exc).__name__, said)

    def _options(self, entry: ModelEntry) -> dict[str, Any]:
        """Options of a diffusers ``from_pretrained`` of ``entry``'s files."""
        options: dict[str, Any] = {_DTYPE_KEYWORD: self.dtype_of(entry)}
        if importlib.util.find_spec("accelerate") is None:
            # Without accelerate, diffusers warns on every load before falling back to this.
            options["low_cpu_mem_usage"] = False
        return options

    def _read_pipeline(self, entry: ModelEntry, path: Path) -> DiffusionPipeline:
        architecture = ARCHITECTURES[entry.architecture]
        options = self._options(entry)
        if entry.source == "single_file":
            assert architecture.single_file_pipeline is not None  # the catalog allows no other
            pipeline_class = getattr(diffusers, architecture.single_file_pipeline)
            # diffusers' own conversion would read a scaled float8 file's weights without their factors.
            if architecture.family == "flux" and (is_gguf(path) or architecture.single_file_config is not None
                                                  or _is_scaled_float8_file(path)):
                return self._read_flux_transformer_file(entry, path, pipeline_class, options)
            # A single file has no configs; diffusers fetches them from the hub, or its cache, unless
            # the architecture's come from an embedded model built here.
            local_only = not self.allow_downloads
            if architecture.single_file_config is not None:
                builder = architecture.single_file_config
                options["config"] = str(ensure_embedded(builder, self.data_dir / "models" / "configs" / builder))
                local_only = True
            elif entry.architecture in PIPELINE_CONFIGS:
                # Our own configs and tokenizers: nothing is looked up on the hub.
                options.update(self._single_file_configs(entry, path))
                local_only = True
            pipe: DiffusionPipeline = pipeline_class.from_single_file(
                str(path), local_files_only=local_only, **options)
            return pipe
        if _has_safety_checker(path):
            # Clients ask for NSFW checks explicitly; the server runs its own, never the pipeline's.
            options.update(safety_checker=None, requires_safety_checker=False)
        if architecture.pipeline is not None:
            named: DiffusionPipeline = getattr(diffusers, architecture.pipeline).from_pretrained(str(path), **options)
            return named
        if architecture.image_to_image_only:
            return AutoPipelineForImage2Image.from_pretrained(str(path), **options)
        if architecture.inpainting_only:
            return AutoPipelineForInpainting.from_pretrained(str(path), **options)
        return AutoPipelineForText2Image.from_pretrained(str(path), **options)

    def _read_flux_transformer_file(self, entry: ModelEntry, path: Path, pipeline_class: Any,
                                    options: dict[str, Any]) -> DiffusionPipeline:
        """A FLUX pipeline around the transformer saved alone at ``path`` (GGUF, float8, …; ``flux_files.py``),
        its other components from the embedded model whose configs the architecture takes, or from the pieces of
        its models folder. diffusers' pipeline ``from_single_file`` reads neither a GGUF file nor a transformer
        narrower than FLUX.1's, so the transformer is read on its own and the pipeline built around it."""
        architecture = ARCHITECTURES[entry.architecture]
        what = f"the file of {entry.label} ({path})"
        if is_gguf(path):
            require_gguf(what)
        others: dict[str, Any] = {}
        if architecture.single_file_config is not None:
            builder = architecture.single_file_config
            folder = ensure_embedded(builder, self.data_dir / "models" / "configs" / builder)
        else:
            others = self._single_file_configs(entry, path)
            folder = Path(others.pop("config"))
        try:
            transformer = read_flux_transformer(path, config=folder, dtype=self.dtype_of(entry))
        except NotAFluxTransformer as exc:
            raise WeightsMissing(f"{what} {exc}") from exc
        logger.info("read the transformer of %s from %s (%s)", entry.air, path, weights_format(path) or "unquantized")
        pipe: DiffusionPipeline = pipeline_class.from_pretrained(str(folder), transformer=transformer, **others,
                                                                 **options)
        return pipe

    def _single_file_configs(self, entry: ModelEntry, path: Path) -> dict[str, Any]:
        """``from_single_file`` options that point it at the configs written here for ``entry``'s architecture,
        with the components its file lacks: loaded from the pieces of its models folder (a FLUX transformer saved
        alone, with ComfyUI's text_encoders/ and vae/), or left out where the pipeline runs without them (SD 3's
        T5). WeightsMissing lists the pieces it lacks that a pipeline needs, and where they were looked for."""
        table = PIPELINE_CONFIGS[entry.architecture]
        # A pickled checkpoint cannot be listed without unpickling it: taken as complete.
        names = tensor_shapes(path) if path.suffix.lower() in (".safetensors", ".gguf") else None
        missing = missing_components(entry.architecture, names) if names is not None else []
        pieces = find_pieces(entry.architecture, missing, path, tensor_shapes) if missing else {}
        needed = [name for name in missing if name not in pieces and name not in table.optional]
        if needed:
            raise WeightsMissing(f"the file of {entry.label} ({path}) "
                                 + missing_pieces_message(entry.architecture, needed, path))
        # An optional text encoder that is nowhere goes with its tokenizer (text_encoder_3 with tokenizer_3).
        absent = [name for name in missing if name not in pieces]
        left_out = [*absent, *(name.replace("text_encoder", "tokenizer") for name in absent)]
        left_out = [name for name in dict.fromkeys(left_out) if name in table.components]
        folder = config_folder(entry.architecture, self.data_dir / "models" / "configs",
                               leave_out=left_out, tokenizer_dirs=[self.data_dir / "tokenizers"])
        loaded = {name: self._read_piece(entry, name, piece, folder) for name, piece in pieces.items()}
        return {"config": str(folder), **dict.fromkeys(left_out), **loaded}

    def _read_piece(self, entry: ModelEntry, name: str, path: Path, folder: Path) -> Any:
        """One component of a pipeline from its own file (a VAE, a text encoder), in ``entry``'s precision, with the
        config of ``folder/name``."""
        from diffusers.loaders.single_file_utils import (
            create_diffusers_clip_model_from_ldm,
            create_diffusers_t5_model_from_checkpoint,
        )
        from safetensors.torch import load_file

        component = PIPELINE_CONFIGS[entry.architecture].components[name]
        assert component is not None
        dtype = self.dtype_of(entry)
        logger.info("completing %s with its %s from %s", entry.air, name, path)
        if component.class_name == "AutoencoderKL":
            return diffusers.AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder=name,
                                                           local_files_only=True, torch_dtype=dtype)
        model_class = getattr(transformers, component.class_name)
        state = load_file(str(path))
        if component.class_name == "T5EncoderModel":
            # The layout diffusers reads a T5 in from a full checkpoint, which is T5's own names under a prefix.
            prefixed = {f"text_encoders.t5xxl.transformer.{key}": value for key, value in state.items()}
            return create_diffusers_t5_model_from_checkpoint(
                model_class, checkpoint=prefixed, config=str(folder), subfolder=name, torch_dtype=dtype,
                local_files_only=True)
        prefix = "text_encoders.clip_l.transformer." if component.config.get("hidden_size") == 768 else \
            "text_encoders.clip_g.transformer."
        return create_diffusers_clip_model_from_ldm(
            model_class, checkpoint={prefix + key: value for key, value in state.items()}, config=str(folder),
            subfolder=name, torch_dtype=dtype, local_files_only=True)

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _modules(pipe: DiffusionPipeline) -> list[tuple[str, torch.nn.Module]]:
    return [(name, module) for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)]


def place(pipe: DiffusionPipeline, placement: str, device: str) -> None:
    """Put a freshly read pipeline (in host RAM) where ``placement`` says, for calls on ``device``."""
    if placement == ALL_ON_DEVICE:
        pipe.to(device)
    elif placement == TEXT_ENCODERS_ON_CPU:
        for name, module in _modules(pipe):
            if role_of(name) == TEXT_ENCODER:
                _encode_on(module, device)
            else:
                module.to(device)
    elif placement == MODEL_OFFLOAD:
        pipe.enable_model_cpu_offload(device=device)
    elif placement == SEQUENTIAL_OFFLOAD:
        # Group offload, block by block; on CUDA the next block is copied on a side stream while one runs.
        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=device.startswith("cuda"))
    else:
        raise ValueError(f"unknown placement {placement!r}")
    # Which placement a pipeline has, for the engine and the tests to see.
    pipe._imagewire_placement = placement  # type: ignore[attr-defined]


def _hooked(module: torch.nn.Module) -> bool:
    """Whether an offload method moves ``module`` in and out (accelerate's hooks, diffusers' group offload)."""
    return hasattr(module, "_hf_hook") or getattr(module, "_diffusers_hook", None) is not None


def placement_of(pipe: Any) -> str:
    return str(getattr(pipe, "_imagewire_placement", ALL_ON_DEVICE))


def _encode_on(module: torch.nn.Module, device: str) -> None:
    """Keep ``module`` in host RAM but run it on ``device``: moved in before each forward (with its tensor
    arguments), and out after it. Its output stays on the device, where the denoiser wants it."""

    def move_in(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        mod.to(device)
        moved = tuple(value.to(device) if isinstance(value, torch.Tensor) else value for value in args)
        return moved, {key: value.to(device) if isinstance(value, torch.Tensor) else value
                       for key, value in kwargs.items()}

    def move_out(mod: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        mod.to("cpu")
        mod._imagewire_encodes = getattr(mod, "_imagewire_encodes", 0) + 1  # type: ignore[assignment]

    module._imagewire_hooks = [  # type: ignore[assignment]
        module.register_forward_pre_hook(move_in, with_kwargs=True),
        module.register_forward_hook(move_out, with_kwargs=True)]


def unplace(pipe: DiffusionPipeline) -> None:
    """Undo ``place`` (but group offload, which diffusers cannot take off): every module back in host RAM, no
    hooks. For benchmarks that place one pipeline several ways in turn."""
    for _, module in _modules(pipe):
        for hook in getattr(module, "_imagewire_hooks", ()):
            hook.remove()
        module._imagewire_hooks = []  # type: ignore[assignment]
    pipe.remove_all_hooks()
    pipe.to("cpu")
    pipe._imagewire_placement = ALL_ON_DEVICE  # type: ignore[attr-defined]


def _seed_option(sampler_class: Any, seeds: Sequence[int]) -> dict[str, Any]:
    if not seeds or _NOISE_SEED_OPTION not in inspect.signature(sampler_class.__init__).parameters:
        return {}
    return {_NOISE_SEED_OPTION: list(seeds) if len(seeds) > 1 else seeds[0]}


def _takes_strength(pipe: DiffusionPipeline) -> bool:
    """Whether ``pipe`` transforms an image (image-to-image) rather than starting from noise."""
    return "strength" in inspect.signature(type(pipe).__call__).parameters


def _has_safety_checker(path: Path) -> bool:
    try:
        index = json.loads((path / MODEL_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and "safety_checker" in index


def _enable_loading_progress_bars() -> None:
    # Loading a large model takes minutes; its progress bars show the server is not stuck. They
    # stay off only when the operator turned them off for the whole Hugging Face stack.
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in {"1", "true", "yes", "on"}:
        return
    diffusers.utils.logging.enable_progress_bar()
    transformers.utils.logging.enable_progress_bar()


def _view(auto_class: Any, pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Another task's pipeline on ``pipe``'s loaded modules (from_pipe: a second view, not a copy)."""
    view = auto_class.from_pipe(pipe)
    view.set_progress_bar_config(disable=True)
    return view


def _is_scaled_float8_file(path: Path) -> bool:
    """Whether ``path`` is a ComfyUI scaled float8 safetensors file (``quantized.py``), by its header."""
    return path.suffix.lower() == ".safetensors" and is_scaled_float8(tensor_shapes(path))
