"""imageInference jobs on a diffusers pipeline.

The steps mirror a diffusers pipeline's own: pick the pipeline, then per call of at most
``max_batch_size`` images set a fresh sampler, make one CPU generator per image and call the
pipeline with the family's arguments. The jobs given share a batch key, so one call can hold
images of several of them; each job's images go back as soon as their call is done.

After every denoising step the call reports progress for each of its jobs (with a cheap preview
made from the latents, at most once a second, for jobs that asked), and stops at once when every
job in it has been cancelled; a call whose jobs are partly cancelled goes on for the others.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import groupby
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from imagewire.air_registry import ARCHITECTURES
from imagewire.server.device import Cancelled
from imagewire.server.engine.controlnets import ModedControlNets
from imagewire.server.engine.families import FAMILIES, Family
from imagewire.tasks.jobs import Emit, GeneratedImage, InferenceJob, Step

if TYPE_CHECKING:
    from imagewire.server.engine import DiffusersEngine

PREVIEW_INTERVAL_SECONDS = 1.0
PREVIEW_SIDE = 128


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
        chunk = [image for image in images[start : start + engine.max_batch_size] if not emit.cancelled(image[0])]
        if not chunk:
            continue
        seeds = [seed for _, _, seed in chunk]
        pipe.scheduler = pipelines.make_sampler(pipe, first.sampler, seeds=seeds)
        started = time.perf_counter()
        arguments = family.call_arguments([jobs[j] for j, _, _ in chunk])
        arguments["callback_on_step_end"] = _StepReport(jobs, chunk, emit, family)
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


class _StepReport:
    """diffusers' step-end callback for one call: progress per job, previews, cancellation."""

    def __init__(self, jobs: Sequence[InferenceJob], chunk: list[tuple[int, int, int]], emit: Emit,
                 family: Family) -> None:
        self.emit = emit
        self.family = family
        # Each job of the call, with the indexes of its images in it and where they sit in the batch.
        self.owners = [(j, tuple(i for _, i, _ in owned), position)
                       for position, (j, owned) in _first_positions(chunk)]
        self.wants_preview = {j for j, _, _ in self.owners if jobs[j].preview}
        self.last_preview = 0.0

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        total = int(getattr(pipe, "num_timesteps", 0) or step + 1)
        live = [owner for owner in self.owners if not self.emit.cancelled(owner[0])]
        if not live:
            raise Cancelled(f"stopped after step {step + 1} of {total}")
        previews = self._previews(tensors.get("latents"), live)
        for j, indexes, _ in live:
            self.emit.progress(j, Step(indexes, step + 1, total, previews.get(j)))
        return tensors

    def _previews(self, latents: Any, live: list[tuple[int, tuple[int, ...], int]]) -> dict[int, Image.Image]:
        now = time.monotonic()
        wanted = [(j, position) for j, _, position in live if j in self.wants_preview]
        if latents is None or not wanted or now - self.last_preview < PREVIEW_INTERVAL_SECONDS:
            return {}
        self.last_preview = now
        previews = {}
        for j, position in wanted:
            preview = self.family.preview(latents[position])
            if preview is not None:
                preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
                previews[j] = preview
        return previews


def _first_positions(chunk: list[tuple[int, int, int]]) -> list[tuple[int, tuple[int, list[tuple[int, int, int]]]]]:
    """Each job's images in the chunk, with the batch position of its first image."""
    grouped, position = [], 0
    for j, owned in groupby(chunk, key=itemgetter(0)):
        images = list(owned)
        grouped.append((position, (j, images)))
        position += len(images)
    return grouped


def _call(pipe: Any, arguments: dict[str, Any], seeds: list[int]) -> list[Image.Image]:
    # Generators live on the CPU so that a seed gives the same starting noise on every
    # device; diffusers moves the noise to the pipeline's device.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    with torch.inference_mode():
        output = pipe(**arguments, generator=generators, output_type="pil")
    return list(output.images)
