"""What each suite runs: the requests, identical for the raw loop and for the server."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

PROMPT = "a lighthouse on a rocky cliff at dawn, waves, dramatic sky, detailed photograph"
NEGATIVE_PROMPT = "blurry, low quality"
FIRST_SEED = 1234


@dataclass(frozen=True)
class Workload:
    """One kind of request. Seeds advance by one per request, on both sides."""

    name: str
    model: str  # AIR id, resolved through the catalog on both sides
    width: int
    height: int
    steps: int
    img2img: bool = False
    strength: float = 0.8
    cfg_scale: float = 7.0
    output_format: str = "JPG"  # the API default (quality 95), delivered as an imageURL

    def task(self, index: int, seed_image: str | None = None) -> dict[str, Any]:
        """The imageInference task for request ``index``; ``seed_image`` is an imageUUID for img2img."""
        task: dict[str, Any] = {
            "taskType": "imageInference",
            "taskUUID": str(uuid.uuid4()),
            "model": self.model,
            "positivePrompt": PROMPT,
            "negativePrompt": NEGATIVE_PROMPT,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "CFGScale": self.cfg_scale,
            "seed": FIRST_SEED + index,
            "outputFormat": self.output_format,
            "outputType": "URL",
        }
        if self.img2img:
            if seed_image is None:
                raise ValueError(f"workload {self.name} is image-to-image and needs a seed image")
            task["seedImage"] = seed_image
            task["strength"] = self.strength
        return task


@dataclass(frozen=True)
class Budget:
    """How many requests each section sends; ``--quick`` shrinks all of them."""

    sequential: int  # per side (raw and served) for each latency workload
    block: int  # raw and served alternate in blocks of this many, so drift hits both alike
    concurrency_levels: tuple[int, ...]
    tasks_per_connection: int  # at each concurrency level
    rounds: int  # each level alternates with raw blocks in this many rounds
    raw_per_round: int  # requests in each raw block of a level; 0: as many as the served round
    uploads: int  # per upload kind
    encodes: int  # per encoding and size
    memory_tasks: int
    memory_sample_every: int
    warmup: int


FULL_CPU = Budget(sequential=100, block=10, concurrency_levels=(1, 4, 16), tasks_per_connection=0, rounds=12,
                  raw_per_round=0, uploads=20, encodes=20, memory_tasks=1000, memory_sample_every=100, warmup=3)
QUICK = Budget(sequential=2, block=1, concurrency_levels=(1, 4, 16), tasks_per_connection=1, rounds=1, raw_per_round=0,
               uploads=2, encodes=2, memory_tasks=20, memory_sample_every=10, warmup=1)
# GPU tasks take seconds each: fewer samples, short raw references (a GPU's speed hardly drifts), and
# no 1,000-task memory run on the big models. About 5 minutes per architecture on an H100.
FULL_GPU = Budget(sequential=8, block=4, concurrency_levels=(1, 4, 16), tasks_per_connection=0, rounds=1,
                  raw_per_round=4, uploads=20, encodes=20, memory_tasks=0, memory_sample_every=100, warmup=2)


def tasks_at_level(budget: Budget, connections: int) -> int:
    """Requests per connection at a concurrency level.

    The full suites keep the total about the same at every level (96 on CPU, 8 on GPU when the
    budget says 0), but give every connection at least one request per round. On CPU a request's time
    varies by ±20 % with the host's load, so a level needs about a hundred of them for a ratio that
    repeats within a few percent.
    """
    if budget.tasks_per_connection:
        return budget.tasks_per_connection
    total = 96 if budget.sequential >= 50 else 8
    return max(budget.rounds, total // connections)


@dataclass(frozen=True)
class Suite:
    name: str
    device: str  # what the server and the raw loop run on
    latency: tuple[Workload, ...]  # raw vs served sequential
    concurrency: tuple[Workload, ...]  # throughput at each concurrency level
    memory: tuple[Workload, ...] = ()  # the long RSS run alternates these
    neighbour: Workload | None = None  # throughput beside a busy process (CPU suite)
    built_models: tuple[str, ...] = ()  # architectures built with random weights and served from a catalog
    small_models: bool = False  # build them shrunk (the GPU suite's dry run on a CPU)
    upload_sizes: tuple[int, ...] = (512, 1024)
    encode_sizes: tuple[int, ...] = (256, 512, 1024)


TINY = "imagewire:tiny@1"
TINY_IMG2IMG = Workload("tiny img2img 256² 8 steps", TINY, 256, 256, 8, img2img=True, strength=0.8)
TINY_TXT2IMG = Workload("tiny txt2img 256² 8 steps", TINY, 256, 256, 8)
TINY_MEMORY = (
    Workload("tiny txt2img 128² 2 steps", TINY, 128, 128, 2),
    Workload("tiny img2img 128² 2 steps", TINY, 128, 128, 2, img2img=True, strength=0.5),
)
# The quick run keeps every section but makes each request as cheap as the model allows.
TINY_QUICK = Workload("tiny img2img 128² 2 steps", TINY, 128, 128, 2, img2img=True, strength=0.5)


def cpu_suite(quick: bool) -> Suite:
    if quick:
        return Suite("cpu", "cpu", latency=(TINY_QUICK,), concurrency=(TINY_QUICK,), memory=TINY_MEMORY,
                     upload_sizes=(256,), encode_sizes=(256,))
    return Suite("cpu", "cpu", latency=(TINY_IMG2IMG, TINY_TXT2IMG), concurrency=(TINY_IMG2IMG,),
                 memory=TINY_MEMORY, neighbour=TINY_IMG2IMG)


GPU_STEPS = 30
GPU_STRENGTH = 0.7
GPU_SIZES = {"sd15": 512, "sdxl": 1024, "flux": 1024, "sd35": 1024}


def built_model_air(architecture: str) -> str:
    """The AIR id the suite's catalog gives a built model (see ``bench.gpu_models.catalog_entry``)."""
    return f"bench:{architecture}-random@1"


def gpu_suite(architectures: tuple[str, ...], dry_run: bool) -> Suite:
    """Text-to-image and image-to-image on each architecture at its native size, 30 steps, strength 0.7.

    The dry run builds the same architectures shrunk and runs them on the CPU at 128², 2 steps:
    every step of the real suite, at no real size.
    """
    workloads: list[Workload] = []
    for architecture in architectures:
        size = 128 if dry_run else GPU_SIZES[architecture]
        steps = 2 if dry_run else GPU_STEPS
        model = built_model_air(architecture)
        label = f"{architecture} {{}} {size}² {steps} steps"
        workloads.append(Workload(label.format("txt2img"), model, size, size, steps))
        workloads.append(Workload(label.format("img2img"), model, size, size, steps, img2img=True,
                                  strength=GPU_STRENGTH))
    return Suite("gpu", "cpu" if dry_run else "cuda", latency=tuple(workloads), concurrency=tuple(workloads),
                 built_models=architectures, small_models=dry_run,
                 upload_sizes=(512, 1024) if not dry_run else (256,),
                 encode_sizes=(512, 1024) if not dry_run else (128,))
