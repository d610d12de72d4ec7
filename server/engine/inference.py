"""imageInference jobs on a diffusers pipeline.

The steps mirror a diffusers pipeline's own: pick the pipeline, then per call of at most
``max_batch_size`` images set a fresh sampler, make one CPU generator per image and call the
pipeline with the family's arguments. The jobs given share a batch key, so one call can hold
images of several of them; each job's images go back as soon as their call is done.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import groupby
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import torch
from PIL.Image import Image

from imagewire.air_registry import ARCHITECTURES
from imagewire.server.engine.controlnets import ModedControlNets
from imagewire.server.engine.families import FAMILIES
from imagewire.tasks.jobs import Emit, GeneratedImage, InferenceJob

if TYPE_CHECKING:
    from imagewire.server.engine import DiffusersEngine


def run(engine: DiffusersEngine, jobs: Sequence[InferenceJob], emit: Emit) -> None:
    first = jobs[0]
    pipelines = engine.pipelines
    # 1. the pipeline: image-to-image and inpainting share the weights of text-to-image
    if first.mask_image is not None:
        pipe = pipelines.inpainting(first.model, first.weights)
    elif first.init_image is not None:
        pipe = pipelines.image_to_image(first.model, first.weights)
    else:
        pipe = pipelines.text_to_image(first.model, first.weights)
    if first.controlnets:
        pipe = pipelines.with_controlnet(pipe, _controlnets(engine, first))
    family = FAMILIES[ARCHITECTURES[first.model.architecture].family]
    # 2. every image to make, as (job index, image index within its job, seed)
    images = [(j, i, seed) for j, job in enumerate(jobs) for i, seed in enumerate(job.seeds)]
    # 3. calls of at most max_batch_size images, each image with its own generator, and a
    #    fresh sampler per call: samplers keep per-run state, and the SDE ones take their
    #    noise seeds from the sampler rather than the generators
    for start in range(0, len(images), engine.max_batch_size):
        chunk = images[start : start + engine.max_batch_size]
        seeds = [seed for _, _, seed in chunk]
        pipe.scheduler = pipelines.make_sampler(pipe, first.sampler, seeds=seeds)
        started = time.perf_counter()
        arguments = family.call_arguments([jobs[j] for j, _, _ in chunk])
        pictures = _call(pipe, arguments, seeds)
        share = (time.perf_counter() - started) / len(chunk)
        made = [(j, GeneratedImage(i, seed, picture, share))
                for (j, i, seed), picture in zip(chunk, pictures, strict=True)]
        for j, owned in groupby(made, key=itemgetter(0)):  # a job's images are adjacent in ``images``
            emit(j, [image for _, image in owned])


def _controlnets(engine: DiffusersEngine, job: InferenceJob) -> ModedControlNets:
    nets = [engine.pipelines.controlnet(control.model, control.weights) for control in job.controlnets]
    # The pipelines run classifier-free guidance for a CFG scale above 1.
    return ModedControlNets(nets, [control.mode for control in job.controlnets], guided=job.cfg_scale > 1)


def _call(pipe: Any, arguments: dict[str, Any], seeds: list[int]) -> list[Image]:
    # Generators live on the CPU so that a seed gives the same starting noise on every
    # device; diffusers moves the noise to the pipeline's device.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    with torch.inference_mode():
        output = pipe(**arguments, generator=generators, output_type="pil")
    return list(output.images)
