"""The engine: runs validated jobs on the device. Lives in the device worker thread.

``DiffusersEngine`` owns the pipelines (``air_registry/loader.py``) and hands each kind of job to its
runner: ``JOB_RUNNERS`` maps a job type to the function that runs a group of such jobs (jobs given
together share a batch key, see ``server/device.py``). A new kind of job is a runner module beside
``inference.py`` and a line in ``JOB_RUNNERS``. This package is the only part of the server that imports
torch.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from imagewire.air_registry import AddOnUnusable, ModelEntry, RegistryError, SamplerUnusable
from imagewire.air_registry.loader import PipelineCache, unavailable_samplers
from imagewire.air_registry.tool_loader import ToolModels
from imagewire.server.engine import background, caption, inference, masking, prompts, safety, upscale
from imagewire.server.engine.threads import CpuThreads
from imagewire.tasks.background_removal import BackgroundRemovalJob
from imagewire.tasks.image_caption import CaptionJob
from imagewire.tasks.image_masking import MaskingJob
from imagewire.tasks.image_upscale import UpscaleJob
from imagewire.tasks.inputs import task_error
from imagewire.tasks.jobs import Emit, InferenceJob, Job, ModelPlacement, SafetyCheckJob
from imagewire.tasks.prompt_enhance import PromptJob

log = logging.getLogger("imagewire.engine")

GIB = 1024**3


def memory_budget(device: str, limit: int | None) -> int | None:
    """Bytes the models and their calls may use on ``device``: on CUDA what it has free now (nothing is
    loaded yet), capped by ``limit`` (``--device-memory-gib``); on a CPU ``limit`` alone (None: no limit)."""
    if not device.startswith("cuda"):
        return limit
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return free if limit is None else min(free, limit)

# A job runner (engine, jobs, emit): run jobs of one type and batch key, emitting each job's results.
JobRunner = Callable[["DiffusersEngine", Sequence[Any], Emit], None]

JOB_RUNNERS: dict[type[Job], JobRunner] = {
    InferenceJob: inference.run,
    UpscaleJob: upscale.run,
    BackgroundRemovalJob: background.run,
    CaptionJob: caption.run,
    MaskingJob: masking.run,
    PromptJob: prompts.run,
    SafetyCheckJob: safety.run,
}


class DiffusersEngine:
    def __init__(self, *, device: str, data_dir: Path, allow_downloads: bool, max_batch_size: int,
                 max_loaded_models: int = 1, ram_models: int = 0, device_memory_bytes: int | None = None,
                 quantize: str = "none", compile_denoisers: bool = False) -> None:
        # The engine is built in the device worker thread, which runs every pipeline call.
        self.threads = CpuThreads(device)
        budget = memory_budget(device, device_memory_bytes)
        log.info("device %s: models may use %s", device,
                 "no set amount of memory" if budget is None else f"{budget / GIB:.1f} GiB")
        self.pipelines = PipelineCache(device=device, data_dir=data_dir, allow_downloads=allow_downloads,
                                       max_loaded=max_loaded_models, ram_models=ram_models, memory_budget=budget,
                                       max_batch_size=max_batch_size, quantize=quantize,
                                       compile_denoisers=compile_denoisers)
        # Upscalers, background removers, captioners, prompt models and detectors, beside the pipelines.
        self.tools = ToolModels(device=device, data_dir=data_dir, allow_downloads=allow_downloads)
        self.max_batch_size = max_batch_size
        self.unavailable_samplers = unavailable_samplers()
        for name, why in self.unavailable_samplers.items():
            log.warning("scheduler %s %s; requests for it are refused", name, why)

    @property
    def loaded_models(self) -> dict[str, str]:
        """Where each model in memory is, by AIR: the pipelines' models and their add-ons (``"device"`` or
        ``"ram"``), and the tools' models (on the device)."""
        return {**self.pipelines.memory, **dict.fromkeys(self.tools.loaded_models, "device")}

    @property
    def memory_plans(self) -> dict[str, ModelPlacement]:
        """How each pipeline's model in memory is placed, by AIR (modelSearch, metrics)."""
        return {air: ModelPlacement(plan.placement, plan.device, plan.resident_bytes, plan.model_bytes,
                                    plan.quantization, plan.saved_bytes)
                for air, plan in self.pipelines.plans.items()}

    def load(self, model: ModelEntry) -> None:
        self.pipelines.load(model)

    def before_call(self) -> None:
        self.threads.adjust()

    def run(self, jobs: Sequence[Job], emit: Emit) -> None:
        try:
            JOB_RUNNERS[type(jobs[0])](self, jobs, emit)
        except RegistryError as exc:
            # Weights that do not load; a sampler this model's config rules out; an add-on that does not fit.
            parameter = "scheduler" if isinstance(exc, SamplerUnusable) else "model"
            if isinstance(exc, AddOnUnusable):
                parameter = getattr(jobs[0], "parameter_naming", lambda _: "model")(exc.air)
            raise task_error(exc, parameter) from exc

    def device_memory(self) -> dict[str, int]:
        """Bytes torch holds on the GPU (nothing to say on a CPU)."""
        if not self.pipelines.device.startswith("cuda"):
            return {}
        return {"allocated": torch.cuda.memory_allocated(self.pipelines.device),
                "reserved": torch.cuda.memory_reserved(self.pipelines.device)}

    def recover(self) -> None:
        # Whatever the failed call held (activations, a half-moved offloaded model) goes back to the allocator.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
