"""The fake engine (``--engine fake``): every job answered at once, with no model, no weights and no torch.

The rest of the server is the real one (protocol, authentication, validation, the device queue, the store,
delivery, REST, progress, cancelling), so client code written against Runware's API can run its tests against
``imagewire-server --engine fake`` in milliseconds. It is also the tests' and the benchmarks' stand-in for the
diffusers engine (``tests/engines.py`` builds its held engine on it).

What each job gets, the same types the real runners in ``server/engine/`` emit:

- imageInference: a picture of the requested size, a gradient with a checker over it whose colours, cell size
  and direction come from a hash of the request (model, add-ons, prompts, steps, CFG scale, sampler,
  ControlNets and their guide images) and the seed. The same request gives the same bytes; another seed or
  prompt gives another picture. Image-to-image blends it over the seed image by ``strength``; inpainting keeps
  the seed image outside the mask. A few ``Step`` events come first (with a small preview when the job asks
  for one), and a call stops when all its jobs are cancelled.
- a prompt containing the word ``nsfw`` (any case) gives a magenta picture (magenta where the mask is, when
  inpainting), and the content safety check flags any picture at least a quarter magenta: clients can test
  their NSFW path with ``checkNSFW`` (the result comes back black with ``NSFWContent`` true) or
  ``safety.checkInputs`` (a magenta seed image is refused). No pattern pixel is ever near magenta.
- imageUpscale: the input resized to the result size; imageBackgroundRemoval: a soft ellipse in the middle
  as the subject's mask; imageCaption: a sentence naming the input's size and mean colour (after the
  caption's prompt, if any); imageMasking: up to four boxes placed and scored by a hash of the query and the
  picture's size, those above the confidence kept; promptEnhance: ``promptVersions`` distinct texts, the
  prompt followed by words chosen by the seed, within ``promptMaxLength`` words.

Loading a model succeeds for any catalog entry and reads nothing; the server skips looking for weights with
this engine (``Settings.needs_weights``). ``step_seconds`` slows the fake down, one pause per reported step,
for tests that need a job to be running while they act.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from imagewire.server.device import Cancelled
from imagewire.tasks.background_removal import BackgroundRemovalJob
from imagewire.tasks.errors import InvalidParameter
from imagewire.tasks.image_caption import CaptionJob
from imagewire.tasks.image_masking import Box, Detections, MaskingJob
from imagewire.tasks.image_upscale import UpscaleJob
from imagewire.tasks.jobs import (
    Emit,
    GeneratedImage,
    GeneratedText,
    InferenceJob,
    Job,
    ProcessedImage,
    SafetyCheckJob,
    Step,
)
from imagewire.tasks.prompt_enhance import PromptJob

if TYPE_CHECKING:
    from imagewire.air_registry import ModelEntry

# The word that makes a prompt's pictures ones the fake safety check flags, and how those look.
FLAG_WORD = "nsfw"
FLAGGED_COLOUR = (255, 0, 255)
# How far from FLAGGED_COLOUR (per channel) a pixel may be and count as magenta, and the share of such pixels
# that makes a picture flagged. Patterns keep every channel within PATTERN_LEVELS, so no pattern pixel counts.
FLAGGED_DISTANCE = 24
FLAGGED_SHARE = 0.25
PATTERN_LEVELS = (48, 207)
CHECKER_CONTRAST = 16
# Step events per call: the last step and evenly spaced ones before it.
REPORTED_STEPS = 4
PREVIEW_SIDE = 128
# Words promptEnhance adds after the prompt; each version starts from another one, so versions differ.
DETAILS = ("cinematic", "detailed", "sharp", "vivid", "soft", "golden", "misty", "dramatic", "serene",
           "intricate", "luminous", "moody", "painterly", "glowing", "textured", "minimal", "ornate",
           "pastel", "stormy", "sunlit", "nocturnal", "whimsical", "geometric", "weathered")
COLOUR_NAMES = {"black": (0, 0, 0), "grey": (128, 128, 128), "white": (255, 255, 255), "red": (200, 40, 40),
                "orange": (230, 140, 30), "yellow": (230, 220, 50), "green": (50, 170, 60), "cyan": (40, 200, 210),
                "blue": (40, 70, 200), "purple": (130, 50, 170), "magenta": FLAGGED_COLOUR,
                "pink": (240, 150, 190), "brown": (120, 80, 40)}


class FakeEngine:
    """The ``Engine`` of ``server/device.py`` without a model: see the module's docstring."""

    unavailable_samplers: Mapping[str, str] = {}  # every sampler "runs"

    def __init__(self, *, step_seconds: float = 0.0) -> None:
        self.step_seconds = step_seconds
        # The models it was asked to load or run on, as if on the device, most recently used last.
        self.loaded_models: dict[str, str] = {}
        self._runners: dict[type[Job], Callable[[Any, Emit], None]] = {
            InferenceJob: self._inference,
            SafetyCheckJob: self._safety,
            UpscaleJob: self._upscale,
            BackgroundRemovalJob: self._background,
            CaptionJob: self._caption,
            MaskingJob: self._masking,
            PromptJob: self._prompt,
        }

    def load(self, model: ModelEntry) -> None:
        self.mark_loaded([model.air])

    def run(self, jobs: Sequence[Job], emit: Emit) -> None:
        self.mark_loaded([air for job in jobs for air in job.models])
        self._runners[type(jobs[0])](jobs, emit)

    def before_call(self) -> None:
        pass

    def recover(self) -> None:
        pass

    def device_memory(self) -> dict[str, int]:
        return {}

    def mark_loaded(self, airs: Sequence[str]) -> None:
        """Report ``airs`` as on the device, as the most recently used."""
        for air in airs:
            self.loaded_models.pop(air, None)
            self.loaded_models[air] = "device"

    def _inference(self, jobs: Sequence[InferenceJob], emit: Emit) -> None:
        started = time.perf_counter()
        pictures = [[picture(job, seed) for seed in job.seeds] for job in jobs]
        total = jobs[0].steps  # jobs share a call only with the same steps
        for done in reported_steps(total):
            live = [index for index in range(len(jobs)) if not emit.cancelled(index)]
            if not live:
                raise Cancelled(f"stopped after step {done} of {total}")
            for index in live:
                job = jobs[index]
                preview = _preview(pictures[index][0], done / total) if job.preview else None
                emit.progress(index, Step(tuple(range(len(job.seeds))), done, total, preview))
            if self.step_seconds:
                time.sleep(self.step_seconds)
        share = (time.perf_counter() - started) / sum(len(job.seeds) for job in jobs)
        for index, job in enumerate(jobs):
            if not emit.cancelled(index):
                emit(index, [GeneratedImage(i, seed, made, share)
                             for i, (seed, made) in enumerate(zip(job.seeds, pictures[index], strict=True))])

    def _safety(self, jobs: Sequence[SafetyCheckJob], emit: Emit) -> None:
        for index, job in enumerate(jobs):
            emit(index, [flagged(picture) for picture in job.pictures])

    def _upscale(self, jobs: Sequence[UpscaleJob], emit: Emit) -> None:
        for index, job in enumerate(jobs):
            started = time.perf_counter()
            enlarged = job.image.convert("RGB").resize((job.width, job.height), Image.Resampling.BICUBIC)
            emit(index, [ProcessedImage(enlarged, time.perf_counter() - started)])

    def _background(self, jobs: Sequence[BackgroundRemovalJob], emit: Emit) -> None:
        for index, job in enumerate(jobs):
            started = time.perf_counter()
            emit(index, [ProcessedImage(subject_mask(*job.image.size), time.perf_counter() - started)])

    def _caption(self, jobs: Sequence[CaptionJob], emit: Emit) -> None:
        for index, job in enumerate(jobs):
            started = time.perf_counter()
            emit(index, [GeneratedText(caption(job.image, job.prompt), time.perf_counter() - started)])

    def _masking(self, jobs: Sequence[MaskingJob], emit: Emit) -> None:
        for index, job in enumerate(jobs):
            width, height = job.image.size
            found = [box for box in detected_boxes(job.query, width, height) if box.score > job.confidence]
            emit(index, [Detections(tuple(found[:job.max_detections]), 0.0)])

    def _prompt(self, jobs: Sequence[PromptJob], emit: Emit) -> None:
        for index, job in enumerate(jobs):
            for text in enhanced_prompts(job.prompt, job.max_tokens, job.versions, job.seed):
                emit(index, [GeneratedText(text, 0.0)])


def reported_steps(total: int) -> list[int]:
    """The steps a call of ``total`` steps reports: at most ``REPORTED_STEPS``, the last one among them."""
    return sorted({max(1, round(total * part / REPORTED_STEPS)) for part in range(1, REPORTED_STEPS + 1)})


def _digest(*parts: object) -> bytes:
    hashed = hashlib.blake2b(digest_size=16)
    for part in parts:
        hashed.update(repr(part).encode())
        hashed.update(b"\0")
    return hashed.digest()


def pattern(key: bytes, width: int, height: int) -> Image.Image:
    """A gradient between two colours with a checker over it, all chosen by ``key``."""
    low, high = PATTERN_LEVELS
    span = high - low - 2 * CHECKER_CONTRAST
    start = np.array([low + CHECKER_CONTRAST + value % span for value in key[0:3]], dtype=np.float32)
    end = np.array([low + CHECKER_CONTRAST + value % span for value in key[3:6]], dtype=np.float32)
    cell = 8 << (key[6] % 4)
    rows = np.arange(height, dtype=np.float32)[:, None]
    columns = np.arange(width, dtype=np.float32)[None, :]
    direction = key[7] % 3  # across, down or diagonal
    along = (columns / max(width - 1, 1) if direction == 0 else rows / max(height - 1, 1) if direction == 1
             else (columns / max(width - 1, 1) + rows / max(height - 1, 1)) / 2)
    along = np.broadcast_to(along, (height, width))[..., None]
    checker = ((rows.astype(np.int64) // cell + columns.astype(np.int64) // cell) % 2)[..., None]
    pixels = start + (end - start) * along + (checker * 2 - 1) * CHECKER_CONTRAST
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")


def request_key(job: InferenceJob, seed: int) -> bytes:
    """What the picture of one seed of ``job`` is made from: everything a real model's result depends on but
    the seed image, which is blended in afterwards."""
    add_ons = (sorted((lora.model.air, lora.weight) for lora in job.loras),
               sorted((embedding.model.air, embedding.weight) for embedding in job.embeddings),
               job.vae.model.air if job.vae else None, job.clip_skip, job.prompt_weighting,
               (job.refiner.model.air, job.refiner.start) if job.refiner else None)
    controlnets = [(control.batch_key(), hashlib.blake2b(guide.tobytes(), digest_size=16).hexdigest())
                   for control, guide in zip(job.controlnets, job.guide_images, strict=True)]
    # IP-Adapters of weight 0 have no influence, as on the real engine; a job with none keeps its old digest.
    adapters = [adapter.batch_key() for adapter in job.ip_adapters if adapter.weight > 0]
    return _digest(job.model.air, add_ons, job.prompt, job.negative_prompt, job.steps, job.cfg_scale,
                   job.sampler.name if job.sampler else None, controlnets, seed, *([adapters] if adapters else []))


def picture(job: InferenceJob, seed: int) -> Image.Image:
    """The fake's image for one seed of ``job``: deterministic from the request, and from its seed image."""
    marked = FLAG_WORD in job.prompt.lower()
    if marked:
        made = Image.new("RGB", (job.width, job.height), FLAGGED_COLOUR)
    else:
        made = pattern(request_key(job, seed), job.width, job.height)
    if job.init_image is None:
        return made
    canvas = job.init_image.convert("RGB").resize(made.size)
    # The marker is not watered down by the seed image: its pictures stay flagged whatever the strength.
    blended = made if marked else Image.blend(canvas, made, job.strength)
    if job.mask_image is None:
        return blended
    return Image.composite(blended, canvas, job.mask_image.convert("L").resize(made.size))


def _preview(final: Image.Image, fraction: float) -> Image.Image:
    """What a preview at ``fraction`` of the steps shows: the result emerging from grey, at a 1/8 scale."""
    width, height = final.size
    small = final.resize((max(1, width // 8), max(1, height // 8)), Image.Resampling.BILINEAR)
    small.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return Image.blend(Image.new("RGB", small.size, (128, 128, 128)), small, fraction)


def flagged(picture: Image.Image) -> bool:
    """The fake safety check: at least ``FLAGGED_SHARE`` of the picture's pixels are near ``FLAGGED_COLOUR``."""
    pixels = np.asarray(picture.convert("RGB"), dtype=np.int16)
    near = np.abs(pixels - np.array(FLAGGED_COLOUR, dtype=np.int16)).max(axis=-1) <= FLAGGED_DISTANCE
    return bool(near.mean() >= FLAGGED_SHARE)


def subject_mask(width: int, height: int) -> Image.Image:
    """A soft-edged ellipse filling the middle of the picture: opaque inside, transparent at the corners."""
    rows = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height * 2 - 1
    columns = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width * 2 - 1
    distance = np.sqrt((columns / 0.8) ** 2 + (rows / 0.8) ** 2)
    alpha = np.clip((1.1 - distance) / 0.2, 0.0, 1.0)
    return Image.fromarray(np.rint(alpha * 255).astype(np.uint8), "L")


def detected_boxes(query: str, width: int, height: int) -> list[Box]:
    """Four boxes, best first, each a quarter to a half of the picture's sides, placed and scored by a hash."""
    key = _digest(query, width, height)
    boxes = []
    for number in range(4):
        part = key[number * 4:number * 4 + 4]
        box_width, box_height = width * (0.25 + part[0] / 1020), height * (0.25 + part[1] / 1020)
        left, top = (width - box_width) * part[2] / 255, (height - box_height) * part[3] / 255
        boxes.append(Box(left, top, left + box_width, top + box_height, score=0.9 - 0.2 * number))
    return boxes


def caption(image: Image.Image, prompt: str | None) -> str:
    """A sentence about the picture's size and mean colour, after the caption's beginning when one is given."""
    mean = np.asarray(image.convert("RGB"), dtype=np.float32).mean(axis=(0, 1))
    red, green, blue = (int(round(value)) for value in mean)
    name = min(COLOUR_NAMES, key=lambda colour: sum((a - b) ** 2 for a, b in zip(COLOUR_NAMES[colour], mean,
                                                                                    strict=True)))
    width, height = image.size
    described = f"a {width}x{height} picture, mostly {name} (#{red:02x}{green:02x}{blue:02x})"
    return f"{prompt} {described}" if prompt else described


def enhanced_prompts(prompt: str, max_words: int, versions: int, seed: int) -> list[str]:
    """``versions`` distinct texts of at most ``max_words`` words: the prompt, then words the seed chooses.

    Like a model that continues the prompt, it refuses a prompt that leaves no room for a word.
    """
    words = " ".join(prompt.split()).split(" ") if prompt.strip() else []
    room = max_words - len(words)
    if room < 1:
        raise InvalidParameter(
            f"promptMaxLength {max_words} leaves no room to enhance a prompt of {len(words)} words; send a larger "
            "promptMaxLength or a shorter prompt.", parameter="promptMaxLength", type="integer")
    first = int.from_bytes(_digest(prompt, seed)[:4], "big")
    texts = []
    for version in range(versions):
        added = [DETAILS[(first + version + 5 * place) % len(DETAILS)] for place in range(min(room, 4))]
        texts.append(" ".join([*words, *added]))
    return texts
