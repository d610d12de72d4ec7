"""What the device works on: jobs, fully validated by their task handlers, and what comes back.

A handler builds a job, the device queue (``server/device.py``) runs it on an engine, and the
engine hands results back per job. Jobs of one type that wait together and share a ``batch_key``
may run in one call. A new kind of job subclasses ``Job`` (in its task's module, or here when
several task types share it) and gets a runner in ``server/engine``. This module imports no
torch: images are PIL images.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from PIL.Image import Image

    from imagewire.air_registry import ModelEntry, SamplerSpec


@dataclass(kw_only=True)
class Job:
    """What every job has: the task it serves and the API key's owner token (fairness, cancelling)."""

    task_uuid: str
    owner: str = ""

    @property
    def images(self) -> int:
        """How many results it makes: what ``--max-batch-size`` counts."""
        return 1

    def batch_key(self) -> Hashable:
        """Jobs of one type with equal keys can run in one call; by default a job runs alone."""
        return id(self)

    @property
    def models(self) -> tuple[str, ...]:
        """AIR ids of the models the job runs on: the device queue prefers jobs whose models are loaded. By
        default the job's ``model`` (the tools' jobs have one), else none."""
        model = getattr(self, "model", None)
        return (model.air,) if model is not None else ()


@dataclass(frozen=True)
class AddOn:
    """A LoRA, an embedding or a VAE that a job applies to its model: the catalog entry, where its weights
    are (found when the task was checked), and its strength (``weight`` on the wire; 1 for a VAE)."""

    model: ModelEntry
    weights: Path
    weight: float = 1.0


@dataclass(frozen=True)
class RefinerPass:
    """An SDXL refiner finishing the image: the job's model denoises up to ``start`` (a fraction of the
    steps), the refiner the rest, in one job."""

    model: ModelEntry
    weights: Path
    start: float


@dataclass(kw_only=True)
class InferenceJob(Job):
    """Everything the device needs for one imageInference task."""

    model: ModelEntry
    weights: Path                   # where the model's weights are, found when the task was checked
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    cfg_scale: float
    sampler: SamplerSpec | None     # None: the model's own
    seeds: list[int]
    init_image: Image | None = None  # already resized to width × height
    strength: float = 0.8
    mask_image: Image | None = None  # inpainting: "L", width × height, white = repaint (init_image is set)
    controlnets: tuple[ControlNetUse, ...] = ()
    guide_images: tuple[Image, ...] = ()  # one per ControlNet, width × height
    preview: bool = False           # progress events carry a low-resolution preview
    loras: tuple[AddOn, ...] = ()
    embeddings: tuple[AddOn, ...] = ()
    vae: AddOn | None = None         # None: the model's own
    clip_skip: int = 0               # text-encoder layers left out at the end
    prompt_weighting: str | None = None  # the prompts' syntax: "compel" or "sdEmbeds"; None: plain text
    refiner: RefinerPass | None = None

    @property
    def images(self) -> int:
        return len(self.seeds)

    def batch_key(self) -> Hashable:
        """Jobs with equal keys can share a pipeline call: all that one call takes as a single value.

        Prompts, seeds and seed images go per image. A missing negative prompt is not the same
        as an empty one for every model, so having one is part of the key.
        """
        return (self.model.air, self.init_image is not None, self.width, self.height, self.steps,
                self.cfg_scale, self.sampler, self.strength if self.init_image is not None else None,
                bool(self.negative_prompt), self.mask_image is not None,
                tuple(control.batch_key() for control in self.controlnets), self.add_ons_key())

    def add_ons_key(self) -> Hashable:
        """What the add-ons make one call share: a set of LoRAs (their order does not matter, their weights
        do), of embeddings, the VAE, the CLIP skip, the prompt syntax and the refiner hand-off."""
        return (frozenset((lora.model.air, lora.weight) for lora in self.loras),
                frozenset((embedding.model.air, embedding.weight) for embedding in self.embeddings),
                self.vae.model.air if self.vae else None, self.clip_skip, self.prompt_weighting,
                (self.refiner.model.air, self.refiner.start) if self.refiner else None)

    @property
    def models(self) -> tuple[str, ...]:
        return (self.model.air,) + ((self.refiner.model.air,) if self.refiner else ()) + tuple(
            control.model.air for control in self.controlnets)

    def parameter_naming(self, air: str) -> str:
        """The request field that named the model ``air`` (for an error when it fails to load)."""
        for name, add_ons in (("lora", self.loras), ("embeddings", self.embeddings)):
            for index, add_on in enumerate(add_ons):
                if add_on.model.air == air:
                    return f"{name}[{index}].model"
        if self.vae is not None and self.vae.model.air == air:
            return "vae"
        if self.refiner is not None and self.refiner.model.air == air:
            return "refiner.model"
        return "model"


@dataclass(frozen=True)
class ControlNetUse:
    """One ControlNet of a job, but its guide image: what every job sharing a call shares."""

    model: ModelEntry
    weights: Path
    weight: float    # controlnet_conditioning_scale
    start: float     # fraction of the denoising steps where it starts guiding …
    end: float       # … and where it stops
    mode: str        # controlMode: balanced | prompt | controlnet

    def batch_key(self) -> Hashable:
        return (self.model.air, self.weight, self.start, self.end, self.mode)


@dataclass(kw_only=True)
class SafetyCheckJob(Job):
    """Pictures for the content safety checker; the result is one flag per picture (True: flagged)."""

    checker: ModelEntry
    weights: Path
    pictures: list[Image]

    @property
    def images(self) -> int:
        return len(self.pictures)

    def batch_key(self) -> Hashable:
        return self.checker.air

    @property
    def models(self) -> tuple[str, ...]:
        return (self.checker.air,)


@dataclass(frozen=True)
class GeneratedImage:
    index: int       # within its job
    seed: int
    image: Image
    seconds: float   # device time spent on this image (its share of its call), for includeCost
    nsfw: bool | None = None  # the content safety checker's verdict, when one was asked for


@dataclass(frozen=True)
class ProcessedImage:
    """An image a tool made from an input image (upscaled, cut out)."""

    image: Image
    seconds: float   # device time spent on it, for includeCost


@dataclass(frozen=True)
class GeneratedText:
    """A caption, or one version of an enhanced prompt."""

    text: str
    seconds: float


@dataclass(frozen=True)
class Queued:
    """The job waits; this many jobs will run before it."""

    position: int


@dataclass(frozen=True)
class Step:
    """A call holding the job's results ``indexes`` finished step ``done`` of ``total``."""

    indexes: tuple[int, ...]
    done: int
    total: int
    preview: Image | None = None  # of the first of ``indexes``, when the job asked for one


JobEvent = Queued | Step


class Emit(Protocol):
    """How a runner hands back what it makes for the jobs it was given (by their index)."""

    def __call__(self, index: int, results: list[Any]) -> None:
        """Results of jobs[index] are ready (called once per call that made some)."""

    def progress(self, index: int, step: Step) -> None: ...

    def cancelled(self, index: int) -> bool:
        """Whether jobs[index] was cancelled: its results are no longer wanted."""
        ...


R_co = TypeVar("R_co", covariant=True)


class JobProgress(Protocol[R_co]):
    """A queued job as its handler sees it: iterate it for chunks of results as they are made."""

    @property
    def queue_seconds(self) -> float: ...

    @property
    def compute_seconds(self) -> float: ...

    def __aiter__(self) -> AsyncIterator[Sequence[R_co]]: ...

    def cancel(self) -> None:
        """Stop the job: it leaves the queue, or its calls stop at their next step. Nothing after it
        arrives. Does nothing once the job is done."""
