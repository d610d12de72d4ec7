"""Runs one validated inference job on a diffusers pipeline. Lives in the device worker thread.

The steps of ``run`` mirror a diffusers pipeline's own: pick the pipeline, set a fresh
scheduler, then per chunk of seeds make the generators and call the pipeline. This is the
only server module that imports torch.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL.Image import Image

from air_registry.catalog import ModelEntry
from air_registry.loader import PipelineCache
from server.scheduler import GeneratedImage, InferenceJob

log = logging.getLogger("imagewire.engine")

# An operator's explicit thread count wins over ours.
THREADS_VARIABLE = "OMP_NUM_THREADS"


def serving_cpu_threads(cores: int) -> int:
    """Torch threads for inference on a CPU with ``cores`` usable cores: all but one.

    torch's OpenMP threads meet at the end of every operation. When anything else takes one of
    their cores (this process's event loop and image encoding, or another process), the threads
    that got there first spin until the missing one is scheduled again, so every operation waits
    a scheduler time slice. On 2 cores with one busy neighbour, a 2-thread pipeline ran 5–80×
    slower and a 1-thread pipeline 1.2× slower (see BENCHMARKS.md); the spare core keeps the
    server responsive and its throughput steady.
    """
    return max(1, cores - 1)


def limit_cpu_threads(device: str) -> int | None:
    """Set torch's thread count for CPU inference in the calling thread; None when left as it is.

    Call it from the thread that runs the pipelines. Left alone on CUDA devices (the CPU only
    feeds the GPU there) and when ``OMP_NUM_THREADS`` is set.
    """
    if device != "cpu" or os.environ.get(THREADS_VARIABLE):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = serving_cpu_threads(cores)
    torch.set_num_threads(threads)
    log.info("CPU inference on %d torch threads of %d cores (%s overrides)", threads, cores, THREADS_VARIABLE)
    return threads


class DiffusersEngine:
    def __init__(self, *, device: str, data_dir: Path, allow_downloads: bool, max_batch_size: int) -> None:
        # The engine is built in the device worker thread, which runs every pipeline call.
        limit_cpu_threads(device)
        self.pipelines = PipelineCache(device=device, data_dir=data_dir, allow_downloads=allow_downloads)
        self.max_batch_size = max_batch_size

    def load(self, model: ModelEntry) -> None:
        self.pipelines.text_to_image(model)

    def run(self, job: InferenceJob, emit: Callable[[list[GeneratedImage]], None]) -> None:
        # 1. the pipeline: image-to-image shares the weights of text-to-image
        if job.init_image is not None:
            pipe = self.pipelines.image_to_image(job.model)
        else:
            pipe = self.pipelines.text_to_image(job.model)
        # 2. chunks of at most max_batch_size images, each image with its own generator, and
        #    a fresh scheduler per chunk: schedulers keep per-run state, and the SDE ones
        #    take their noise seeds from the scheduler rather than the generators
        for start in range(0, len(job.seeds), self.max_batch_size):
            seeds = job.seeds[start : start + self.max_batch_size]
            pipe.scheduler = self.pipelines.make_scheduler(pipe, job.scheduler, seeds=seeds)
            started = time.perf_counter()
            images = self._call(pipe, job, seeds)
            share = (time.perf_counter() - started) / len(seeds)
            pairs = enumerate(zip(seeds, images, strict=True))
            emit([GeneratedImage(start + i, seed, image, share) for i, (seed, image) in pairs])

    def _call(self, pipe: object, job: InferenceJob, seeds: list[int]) -> list[Image]:
        count = len(seeds)
        # Generators live on the CPU so that a seed gives the same starting noise on every
        # device; diffusers moves the noise to the pipeline's device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        arguments: dict[str, object] = {
            "prompt": [job.prompt] * count,
            "negative_prompt": [job.negative_prompt] * count if job.negative_prompt else None,
            "num_inference_steps": job.steps,
            "guidance_scale": job.cfg_scale,
            "generator": generators,
            "output_type": "pil",
        }
        if job.init_image is not None:
            arguments["image"] = [job.init_image] * count
            arguments["strength"] = job.strength
        else:
            arguments["width"] = job.width
            arguments["height"] = job.height
        with torch.inference_mode():
            output = pipe(**arguments)  # type: ignore[operator]
        return list(output.images)

    def recover(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
