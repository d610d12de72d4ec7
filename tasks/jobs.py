"""What the device works on: jobs, fully validated by their task handlers, and what comes back.

A handler builds a job and submits it to the ``Device`` (the seam between tasks and the server, at the
end of this module); the device queue (``server/device.py``) runs it on an engine, and the engine hands
results back per job. Jobs of one type that wait together and share a ``batch_key``
may run in one call. A new kind of job subclasses ``Job`` (in its task's module, or here when
several task types share it) and gets a runner in ``server/engine``. This module imports no
torch: images are PIL images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from imagewire.storage import ImageFormat, SharedWrite, StoredImage, encode_image
from imagewire.tasks.errors import TaskError

if TYPE_CHECKING:
    from PIL.Image import Image

    from imagewire.air_registry import ModelEntry, SamplerSpec
    from imagewire.tasks.acceleration import CacheSettings


@dataclass(frozen=True)
class ImageEncoding:
    """How a task writes its result images (``outputFormat``, ``outputQuality``). The one place images are
    encoded: a task encodes with it, and so does a device in another process (a Ray replica) for a job that
    carries it, so that both give the same bytes."""

    format: ImageFormat
    quality: int

    def encode(self, image: Image) -> EncodedImage:
        return EncodedImage(encode_image(image, self.format, self.quality), self.format, image.size)


@dataclass(frozen=True)
class EncodedImage:
    """A result image already encoded where it was made: only its bytes travel to the task, which stores them."""

    data: bytes = field(repr=False)
    format: ImageFormat
    size: tuple[int, int]


@dataclass(frozen=True)
class StoreOnDevice:
    """Where a device in another process stores a job's encoded images itself, and for how long: set beside the
    job's ``encoding`` when the task answers nothing of its images but their record (``imageUUID``, ``imageURL``) and
    its store is one that process can reach too (a bucket). Only the records then travel back (``StoredImage``).
    A device that cannot reach that store sends the bytes, and the task stores them."""

    shared: SharedWrite       # which store, and the room it had left for the job's owner when the job was built
    ttl: float | None = None  # the task's ttl: seconds the stored images are served


@dataclass(kw_only=True)
class Job:
    """What every job has: the task it serves and the API key's owner token (fairness, cancelling)."""

    task_uuid: str
    owner: str = ""
    # Set by a task that does nothing with its result images but encode them this way: a device in another
    # process encodes them where they are made and sends their bytes (``EncodedImage``), not their pixels. This
    # process's device leaves them as they are: the task encodes them, concurrently with storing the others.
    encoding: ImageEncoding | None = None
    # Set, beside ``encoding``, by such a task whose images may be stored where they are made: a device in another
    # process that reaches the same store stores them (as ``owner``'s) and sends their records. This process's
    # device leaves it unread: the task stores its images.
    store_on_device: StoreOnDevice | None = None
    # Whether the task's client asked for step progress (includeProgress). A replica sends its gateway the
    # steps of such jobs only; the others' steps would be messages nobody but getResponse reads.
    report_steps: bool = True

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
class IpAdapterUse:
    """An IP-Adapter of a job: the catalog entry, where its weights are, its weight (the adapter's scale) and the
    picture that guides it, with a digest of its pixels for the batch key (pixels are not hashed per lookup)."""

    model: ModelEntry
    weights: Path
    weight: float
    guide: Image = field(compare=False, repr=False)
    guide_digest: str = ""

    def batch_key(self) -> Hashable:
        return (self.model.air, self.weight, self.guide_digest)


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
    # Already resized to width × height; for FLUX.1 Kontext, the picture it reads, at its own proportions.
    init_image: Image | None = None
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
    cache: CacheSettings | None = None  # step caching (tasks/acceleration.py); None: every step in full
    ip_adapters: tuple[IpAdapterUse, ...] = ()  # in the request's order

    @property
    def images(self) -> int:
        return len(self.seeds)

    def batch_key(self) -> Hashable:
        """Jobs with equal keys can share a pipeline call: all that one call takes as a single value.

        Prompts, seeds and seed images go per image. A missing negative prompt is not the same
        as an empty one for every model, so having one is part of the key.
        """
        # The seed images of one call are scaled to one size: Kontext's, whose size is its own, only share one
        # with seed images of the same size.
        return (self.model.air, self.init_image.size if self.init_image is not None else None, self.width,
                self.height, self.steps,
                self.cfg_scale, self.sampler, self.strength if self.init_image is not None else None,
                bool(self.negative_prompt), self.mask_image is not None,
                tuple(control.batch_key() for control in self.controlnets), self.add_ons_key(), self.cache)

    def add_ons_key(self) -> Hashable:
        """What the add-ons make one call share: a set of LoRAs (their order does not matter, their weights
        do), of embeddings, the VAE, the CLIP skip, the prompt syntax, the refiner hand-off, and the IP-Adapters
        with their guide images: diffusers gives every image of a call the same guide image per adapter."""
        return (frozenset((lora.model.air, lora.weight) for lora in self.loras),
                frozenset((embedding.model.air, embedding.weight) for embedding in self.embeddings),
                self.vae.model.air if self.vae else None, self.clip_skip, self.prompt_weighting,
                (self.refiner.model.air, self.refiner.start) if self.refiner else None,
                tuple(adapter.batch_key() for adapter in self.ip_adapters))

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
        for index, adapter in enumerate(self.ip_adapters):
            if adapter.model.air == air:
                return f"ipAdapters[{index}].model"
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
    # Encoded only for a job with an ``encoding``, by a device in another process; stored too (its record) for a job
    # with ``store_on_device``, by such a device that reaches that store.
    image: Image | EncodedImage | StoredImage
    seconds: float   # device time spent on this image (its share of its call), for includeCost
    nsfw: bool | None = None  # the content safety checker's verdict, when one was asked for


@dataclass(frozen=True)
class ProcessedImage:
    """An image a tool made from an input image (upscaled, cut out)."""

    image: Image | EncodedImage | StoredImage  # as in ``GeneratedImage``
    seconds: float   # device time spent on it, for includeCost


def encoded_results(chunk: Sequence[Any], encoding: ImageEncoding) -> list[Any]:
    """The results of a chunk with each image encoded (CPU-bound: a caller on an event loop runs it in a thread)."""
    return [dataclasses.replace(result, image=encoding.encode(result.image))
            if isinstance(result, (GeneratedImage, ProcessedImage))
            and not isinstance(result.image, (EncodedImage, StoredImage))
            else result for result in chunk]


def pixels(image: Image | EncodedImage | StoredImage) -> Image:
    """A result's picture, for a task that works on it after the device: such a task sets no ``encoding``."""
    if isinstance(image, (EncodedImage, StoredImage)):
        raise TypeError("a result image came encoded, for a job whose task works on its pixels")
    return image


@dataclass(frozen=True)
class GeneratedText:
    """A caption, or one version of an enhanced prompt."""

    text: str
    seconds: float


# ---------------------------------------------------------------- the device seam
#
# A handler submits a job to the ``Device`` and iterates the ``RunningJob`` it gets back. What happens to the
# job on its way travels as typed events: ``Queued`` and ``Step`` go to the handler's ``on_event`` as they
# happen (``JobEvent``); ``Results``, then one ``Finished`` or ``Failed``, are what the handle yields from.
# Both devices speak them: the device queue of this process (``server/device.py``) posts them from its worker
# thread, and a Ray replica (``server/replica.py``) streams all five (``DeviceEvent``), in order, to its
# gateway. The engine's side of the seam is ``Emit``: what a runner hands its results and steps to, from the
# device's worker thread. ``Emit`` lives here, beside the results and ``Step`` it carries, because runners
# and test engines build those; the ``Engine`` that receives it is the server's (``server/device.py``).


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


@dataclass(frozen=True)
class Results:
    """A chunk of the job's results (``GeneratedImage``, ``ProcessedImage``, …), in the order they were made."""

    chunk: list[Any]


@dataclass(frozen=True)
class Finished:
    """The job is over and nothing more comes: it ran (seconds waiting, computing, and its share of the device
    time of the calls it was in), or it was cancelled."""

    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    device_seconds: float = 0.0


@dataclass(frozen=True)
class Failed:
    """The job is over with this error; nothing more comes."""

    error: TaskError

    def __reduce__(self) -> tuple[Any, ...]:
        # A TaskError subclass whose constructor takes other arguments than the message cannot be unpickled
        # by calling it, as pickle does exceptions: it travels as its class, message and attributes.
        error = self.error
        return _failed, (type(error), error.message, dict(vars(error)))


def _failed(kind: type[TaskError], message: str, attributes: dict[str, Any]) -> Failed:
    error = kind.__new__(kind)
    Exception.__init__(error, message)
    vars(error).update(attributes)
    return Failed(error)


JobEvent = Queued | Step  # what ``on_event`` hears
DeviceEvent = JobEvent | Results | Finished | Failed  # all of a job's stream, as a replica sends it


@dataclass(frozen=True)
class ModelPlacement:
    """Where a loaded model's weights live (``air_registry/memory_plan.py``): its plan's name, the device its calls
    run on, the bytes it keeps there between calls and the bytes of all its weights (the rest in host RAM), and how
    its weights were quantized on load with the bytes that saved."""

    plan: str
    device: str
    device_bytes: int
    model_bytes: int
    quantization: str = "none"
    saved_bytes: int = 0

    @property
    def host_bytes(self) -> int:
        return self.model_bytes - self.device_bytes


class Emit(Protocol):
    """How a runner hands back what it makes for the jobs it was given (by their index): the engine's side of
    the device seam, called from the device's worker thread."""

    def __call__(self, index: int, results: list[Any]) -> None:
        """Results of jobs[index] are ready (called once per call that made some)."""

    def progress(self, index: int, step: Step) -> None:
        """A call holding jobs[index] finished a step."""

    def cancelled(self, index: int) -> bool:
        """Whether jobs[index] was cancelled: its results are no longer wanted. A runner checks it between steps
        and stops its call (``server/device.py`` ``Cancelled``) once every job in it is."""
        ...


R_co = TypeVar("R_co", covariant=True)


class RunningJob(Protocol[R_co]):
    """A submitted job as its handler sees it: iterate it for chunks of results as they are made."""

    @property
    def queue_seconds(self) -> float:
        """Seconds it waited for a device (so far, while it waits)."""
        ...

    @property
    def compute_seconds(self) -> float:
        """Seconds from its call's start to its end; 0 until it is over."""
        ...

    def __aiter__(self) -> AsyncIterator[Sequence[R_co]]:
        """Chunks of results as they are made; ends when the job is over, raises the TaskError it failed with."""
        ...

    def cancel(self) -> None:
        """Stop the job: it leaves the queue, or its calls stop at their next step (batch-mates carry on). The
        iteration ends, and nothing after it arrives. Does nothing once the job is over."""


class Device(Protocol):
    """What a task handler may ask of the device: the whole device seam. The server's devices (``server/device.py``
    ``DeviceService``) add their lifecycle to it."""

    def submit(self, job: Job, on_event: Callable[[JobEvent], None] | None = None) -> RunningJob[Any]:
        """Queue a job at once, or raise ServiceUnavailable. ``on_event`` hears of its queue position and
        steps, in that order, on the event loop."""
        ...

    @property
    def unavailable_samplers(self) -> Mapping[str, str]:
        """Sampler names this device cannot run, each with the reason (checked at start)."""
        ...

    @property
    def loaded_models(self) -> Mapping[str, str]:
        """Where each model in memory is, by AIR: ``"device"`` (ready to run) or ``"ram"`` (host memory), as of
        the last job."""
        ...

    @property
    def memory_plans(self) -> Mapping[str, ModelPlacement]:
        """How each pipeline model in memory is placed (its memory plan), by AIR, as of the last job."""
        ...
