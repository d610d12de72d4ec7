"""imageInference jobs on a diffusers pipeline.

The steps mirror a diffusers pipeline's own: pick the pipeline and put the jobs' add-ons on it (LoRAs,
embeddings, VAE; the refiner's pipeline too), add the jobs' ControlNets (a view on the same loaded modules,
so the add-ons apply through it) and the jobs' IP-Adapters (``ip_adapters.py``, taken off again when the run
ends), then per call of at most ``max_batch_size`` images set a fresh sampler,
make one CPU generator per image and call the pipeline with the family's arguments (weighted prompts become
embeddings first, with CLIP skip applied while the text encoders run). With a refiner, the model denoises up
to the hand-off and returns latents, and the refiner finishes them. The jobs given share a batch key, so one
call can hold images of several of them; each job's images go back as soon as their call is done.

After every denoising step the call reports progress for each of its jobs (with a cheap preview
made from the latents, at most once a second, for jobs that asked), and stops at once when every
job in it has been cancelled; a call whose jobs are partly cancelled goes on for the others, and so do the
run's other calls (other chunks, other prompt lengths) while any of their jobs is wanted. A refiner's steps
continue the count of the model's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from itertools import groupby
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from imagewire.air_registry import ARCHITECTURES, RegistryError
from imagewire.air_registry.memory_plan import DecodeMode, decode_mode
from imagewire.server.device import Cancelled
from imagewire.server.engine import ip_adapters
from imagewire.server.engine.acceleration import caching
from imagewire.server.engine.conditioning import skipping_clip_layers, weighted_prompt_arguments
from imagewire.server.engine.controlnets import ModedControlNets
from imagewire.server.engine.families import FAMILIES, Family
from imagewire.tasks.inputs import task_error
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
    # 2. the add-ons (the jobs share them: they are part of the batch key), and the refiner's pipeline,
    #    which decodes the image and so takes the VAE
    refiner = None
    if first.refiner is not None:
        try:
            refiner = pipelines.image_to_image(first.refiner.model, first.refiner.weights, keep=first.models)
        except RegistryError as exc:
            raise task_error(exc, "refiner.model") from exc
        pipelines.use_add_ons(first.refiner.model, vae=first.vae)
    pipelines.use_add_ons(first.model, loras=first.loras, embeddings=first.embeddings,
                          vae=None if refiner is not None else first.vae)
    # 3. the ControlNets: a view made after the add-ons, so that it holds the VAE and tokenizers they chose
    if first.controlnets:
        pipe = pipelines.with_controlnet(pipe, _controlnets(engine, first))
    family = FAMILIES[ARCHITECTURES[first.model.architecture].family]
    # 4. the IP-Adapters (on the pipeline of the calls, the ControlNet view included), taken off when the run ends
    with ip_adapters.applied(engine, pipe, first) as extra:
        _run_calls(engine, pipe, refiner, family, jobs, emit, extra)


def _run_calls(engine: DiffusersEngine, pipe: Any, refiner: Any, family: Family, jobs: Sequence[InferenceJob],
               emit: Emit, extra: dict[str, Any]) -> None:
    first = jobs[0]
    # 5. every image to make, as (job index, image index within its job, seed)
    images = [(j, i, seed) for j, job in enumerate(jobs) for i, seed in enumerate(job.seeds)]
    # 6. calls of at most max_batch_size images (fewer for a model whose calls ran out of memory: the device
    #    queue's emit says how many), each image with its own generator (see _make)
    per_call = min(engine.max_batch_size, getattr(emit, "max_images", None) or engine.max_batch_size)
    for start in range(0, len(images), per_call):
        chunk = [image for image in images[start : start + per_call] if not emit.cancelled(image[0])]
        if not chunk:
            continue
        started = time.perf_counter()
        bound_decode(refiner if refiner is not None else pipe, decoding_mode(engine, first, len(chunk)))
        pictures = _make(engine, pipe, refiner, family, jobs, chunk, emit, extra)
        share = (time.perf_counter() - started) / len(chunk)
        made = [(j, GeneratedImage(i, seed, picture, share))
                for (j, i, seed), picture in zip(chunk, pictures, strict=True) if picture is not None]
        for j, owned in groupby(made, key=itemgetter(0)):  # a job's images are adjacent in ``images``
            emit(j, [image for _, image in owned])


def _make(engine: DiffusersEngine, pipe: Any, refiner: Any, family: Family, jobs: Sequence[InferenceJob],
          chunk: list[tuple[int, int, int]], emit: Emit, extra: dict[str, Any]) -> list[Any]:
    """The images of one chunk (``(job index, image index, seed)`` each): one pipeline call, or with weighted
    prompts one per conditioning length, since padding a prompt to a longer one's length would change its image."""
    first, pipelines = jobs[0], engine.pipelines
    owners = [jobs[j] for j, _, _ in chunk]
    pictures: list[Any] = [None] * len(chunk)
    with skipping_clip_layers([pipe] + ([refiner] if refiner is not None else []), first.clip_skip):
        for positions, embeddings in _parts(pipe, owners):
            part = [chunk[k] for k in positions]
            part_owners, part_seeds = [owners[k] for k in positions], [seed for _, _, seed in part]
            # A fresh sampler per call: samplers keep per-run state, and the SDE ones take their noise seeds
            # from the sampler rather than the generators.
            pipe.scheduler = pipelines.make_sampler(pipe, first.sampler, seeds=part_seeds)
            arguments = {**family.call_arguments(part_owners), **extra}  # extra: the IP-Adapters' guide images
            report = _StepReport(jobs, part, emit, family, engine.threads.adjust,
                                 total=first.steps if refiner is not None else None)
            generators = _generators(part_seeds)
            try:
                # The step cache covers the model's own steps; a refiner finishes without one.
                with caching(pipe, first.cache) as clock:
                    arguments["callback_on_step_end"] = clock.after(report)
                    if refiner is None:
                        made = _call(pipe, _prompted(arguments, embeddings), generators)
                    else:
                        assert first.refiner is not None
                        latents = _call(pipe, {**_prompted(arguments, embeddings),
                                               "denoising_end": first.refiner.start}, generators, output_type="latent")
                if refiner is not None:
                    assert first.refiner is not None
                    refiner.scheduler = pipelines.make_sampler(refiner, first.sampler, seeds=part_seeds)
                    finishing = {"prompt": arguments["prompt"], "negative_prompt": arguments["negative_prompt"],
                                 "num_inference_steps": first.steps, "guidance_scale": first.cfg_scale,
                                 "denoising_start": first.refiner.start, "image": latents,
                                 "callback_on_step_end": report}
                    refined = None if embeddings is None else _weighted(refiner, part_owners)
                    made = _call(refiner, _prompted(finishing, refined), generators)
            except _CallStopped:
                continue  # every job of this call was cancelled; the others' calls go on
            for position, picture in zip(positions, made, strict=True):
                pictures[position] = picture
    return pictures


def decoding_mode(engine: DiffusersEngine, job: InferenceJob, images: int) -> DecodeMode:
    """How a call of ``images`` images of ``job``'s size decodes within what the model's memory plan leaves
    beside its weights: whole, image by image, or in tiles (``memory_plan.decode_mode``)."""
    pipelines = engine.pipelines
    model = job.refiner.model if job.refiner is not None else job.model
    dtype_bytes = torch.finfo(pipelines.dtype_of(model)).bits // 8
    return decode_mode(pipelines.decode_headroom(model), images, job.width, job.height, dtype_bytes)


def bound_decode(pipe: Any, mode: DecodeMode) -> None:
    """Switch the VAE of ``pipe`` to ``mode`` for the next call (the VAE is shared by the model's views)."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "use_tiling"):
        return
    vae.use_slicing = mode.slicing
    vae.use_tiling = mode.tiling
    if mode.tiling:
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_sample_min_size = mode.tile_side
        vae.tile_latent_min_size = mode.tile_side // scale


class _CallStopped(Exception):
    """Raised by the step callback when every job of one call is cancelled but jobs of other calls of the
    same run are not: that call stops, the run goes on. (``Cancelled`` stops the run: nobody is left.)"""


def _controlnets(engine: DiffusersEngine, job: InferenceJob) -> ModedControlNets:
    nets = [engine.pipelines.controlnet(control.model, control.weights) for control in job.controlnets]
    # The pipelines run classifier-free guidance for a CFG scale above 1.
    return ModedControlNets(nets, [control.mode for control in job.controlnets], guided=job.cfg_scale > 1)


class _StepReport:
    """diffusers' step-end callback for one call (or a model's call and its refiner's, which continue its
    count up to ``total``): progress per job, previews, cancellation, and the CPU thread count for the
    next steps (``between_steps``)."""

    def __init__(self, jobs: Sequence[InferenceJob], chunk: list[tuple[int, int, int]], emit: Emit,
                 family: Family, between_steps: Callable[[], object], total: int | None = None) -> None:
        self.jobs = len(jobs)
        self.emit = emit
        self.between_steps = between_steps
        self.family = family
        self.total = total
        self.done = 0
        # Each job of the call, with the indexes of its images in it and where they sit in the batch.
        self.owners = [(j, tuple(i for _, i, _ in owned), position)
                       for position, (j, owned) in _first_positions(chunk)]
        self.wants_preview = {j for j, _, _ in self.owners if jobs[j].preview}
        self.last_preview = 0.0

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        self.done += 1
        total = max(self.done, self.total or int(getattr(pipe, "num_timesteps", 0) or step + 1))
        live = [owner for owner in self.owners if not self.emit.cancelled(owner[0])]
        if not live:
            if all(self.emit.cancelled(j) for j in range(self.jobs)):
                raise Cancelled(f"stopped after step {self.done} of {total}")
            raise _CallStopped(f"stopped after step {self.done} of {total}")
        previews = self._previews(tensors.get("latents"), live)
        for j, indexes, _ in live:
            self.emit.progress(j, Step(indexes, self.done, total, previews.get(j)))
        self.between_steps()
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


def _generators(seeds: list[int]) -> list[torch.Generator]:
    # Generators live on the CPU so that a seed gives the same starting noise on every
    # device; diffusers moves the noise to the pipeline's device.
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def _parts(pipe: Any, owners: list[InferenceJob]) -> list[tuple[list[int], dict[str, Any] | None]]:
    """The chunk's calls: positions in it, and with weighted prompts their embeddings (None: plain prompts)."""
    if owners[0].prompt_weighting is None:
        return [(list(range(len(owners))), None)]
    by_length: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for position, job in enumerate(owners):
        embeddings = _weighted(pipe, [job])
        by_length.setdefault(embeddings["prompt_embeds"].shape[1], []).append((position, embeddings))
    return [([position for position, _ in group],
             {key: torch.cat([embeddings[key] for _, embeddings in group]) for key in group[0][1]})
            for group in by_length.values()]


def _weighted(pipe: Any, owners: list[InferenceJob]) -> dict[str, Any]:
    with torch.inference_mode():
        return weighted_prompt_arguments(pipe, [job.prompt for job in owners],
                                         [job.negative_prompt for job in owners], owners[0].prompt_weighting or "")


def _prompted(arguments: dict[str, Any], embeddings: dict[str, Any] | None) -> dict[str, Any]:
    """With weighted prompts, the call takes their embeddings instead of the prompts."""
    if embeddings is None:
        return arguments
    rest = {key: value for key, value in arguments.items() if key not in ("prompt", "negative_prompt")}
    return {**rest, **embeddings}


def _call(pipe: Any, arguments: dict[str, Any], generators: list[torch.Generator],
          output_type: str = "pil") -> Any:
    with torch.inference_mode():
        output = pipe(**arguments, generator=generators, output_type=output_type)
    return output.images if output_type == "latent" else list(output.images)
