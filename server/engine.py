"""Runs validated inference jobs on a diffusers pipeline. Lives in the device worker thread.

The steps of ``run`` mirror a diffusers pipeline's own: pick the pipeline, set a fresh
sampler, then per batch of images make the generators and call the pipeline. The jobs of
one ``run`` share a batch key (see ``server/device.py``), so one call can hold images of
several of them. This is the only server module that imports torch.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Sequence
from itertools import groupby
from operator import itemgetter
from pathlib import Path

import torch
from PIL.Image import Image

from imagewire.air_registry import ModelEntry, RegistryError, SamplerUnusable
from imagewire.air_registry.loader import PipelineCache, unavailable_samplers
from imagewire.tasks.inputs import task_error
from imagewire.tasks.jobs import Emit, GeneratedImage, InferenceJob

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
        self.unavailable_samplers = unavailable_samplers()
        for name, why in self.unavailable_samplers.items():
            log.warning("scheduler %s %s; requests for it are refused", name, why)

    def load(self, model: ModelEntry) -> None:
        self.pipelines.text_to_image(model)

    def run(self, jobs: Sequence[InferenceJob], emit: Emit) -> None:
        try:
            self._run(jobs, emit)
        except RegistryError as exc:
            # Weights that do not load; a sampler this model's config rules out.
            parameter = "scheduler" if isinstance(exc, SamplerUnusable) else "model"
            raise task_error(exc, parameter) from exc

    def _run(self, jobs: Sequence[InferenceJob], emit: Emit) -> None:
        first = jobs[0]  # the jobs share a batch key: model, size, steps, sampler, …
        # 1. the pipeline: image-to-image shares the weights of text-to-image
        if first.init_image is not None:
            pipe = self.pipelines.image_to_image(first.model, first.weights)
        else:
            pipe = self.pipelines.text_to_image(first.model, first.weights)
        # 2. every image to make, as (job index, image index within its job, seed)
        images = [(j, i, seed) for j, job in enumerate(jobs) for i, seed in enumerate(job.seeds)]
        # 3. calls of at most max_batch_size images, each image with its own generator, and a
        #    fresh sampler per call: samplers keep per-run state, and the SDE ones take their
        #    noise seeds from the sampler rather than the generators
        for start in range(0, len(images), self.max_batch_size):
            chunk = images[start : start + self.max_batch_size]
            seeds = [seed for _, _, seed in chunk]
            pipe.scheduler = self.pipelines.make_sampler(pipe, first.sampler, seeds=seeds)
            started = time.perf_counter()
            pictures = self._call(pipe, [jobs[j] for j, _, _ in chunk], seeds)
            share = (time.perf_counter() - started) / len(chunk)
            made = [(j, GeneratedImage(i, seed, picture, share))
                    for (j, i, seed), picture in zip(chunk, pictures, strict=True)]
            for j, owned in groupby(made, key=itemgetter(0)):  # a job's images are adjacent in ``images``
                emit(j, [image for _, image in owned])

    def _call(self, pipe: object, owners: list[InferenceJob], seeds: list[int]) -> list[Image]:
        """One pipeline call; ``owners[k]`` is the job image k belongs to (its prompts, its seed image)."""
        first = owners[0]
        # Generators live on the CPU so that a seed gives the same starting noise on every
        # device; diffusers moves the noise to the pipeline's device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        arguments: dict[str, object] = {
            "prompt": [job.prompt for job in owners],
            "negative_prompt": [job.negative_prompt for job in owners] if first.negative_prompt else None,
            "num_inference_steps": first.steps,
            "guidance_scale": first.cfg_scale,
            "generator": generators,
            "output_type": "pil",
        }
        if first.init_image is not None:
            arguments["image"] = [job.init_image for job in owners]
            arguments["strength"] = first.strength
        else:
            arguments["width"] = first.width
            arguments["height"] = first.height
        with torch.inference_mode():
            output = pipe(**arguments)  # type: ignore[operator]
        return list(output.images)

    def recover(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
