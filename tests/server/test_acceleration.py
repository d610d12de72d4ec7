"""Step caches on the diffusers engine, with the embedded tiny models: each cache changes the image a little and
repeats exactly, reuses only where its settings allow, leaves the pipeline clean after every call, and never
shares a call with other settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagewire.air_registry import Catalog
from imagewire.air_registry.weights import locate_weights
from imagewire.server.device import Cancelled
from imagewire.server.engine import DiffusersEngine
from imagewire.server.engine.acceleration import hooked_modules, skip_branches
from imagewire.tasks.acceleration import MAX_THRESHOLD, CacheSettings
from imagewire.tasks.errors import InvalidParameter
from imagewire.tasks.jobs import InferenceJob, Step
from tests.engines import Collect, diffusers_engine
from tests.images import psnr

CATALOG = Catalog.load()
STEPS = 8


def deep(**changes: object) -> CacheSettings:
    return dataclasses.replace(CacheSettings(kind="deepCache", start=0, end=STEPS + 1, max_consecutive=3,
                                             interval=3, branch=0), **changes)  # type: ignore[arg-type]


def first_block(**changes: object) -> CacheSettings:
    return dataclasses.replace(CacheSettings(kind="teaCache", start=0, end=STEPS + 1, max_consecutive=3,
                                             threshold=MAX_THRESHOLD), **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(module_data_dir: Path) -> DiffusersEngine:
    return diffusers_engine(module_data_dir)


JobMaker = Callable[..., InferenceJob]


@pytest.fixture
def job(engine: DiffusersEngine) -> JobMaker:
    def make(model: str = "imagewire:tiny@1", cache: CacheSettings | None = None, seeds: tuple[int, ...] = (5,),
             name: str = "a", prompt: str = "a red fox") -> InferenceJob:
        entry = CATALOG.resolve(model)
        weights = locate_weights(entry, data_dir=engine.pipelines.data_dir, allow_downloads=False)
        return InferenceJob(task_uuid=name, model=entry, weights=weights, prompt=prompt, negative_prompt=None,
                            width=128, height=128, steps=STEPS, cfg_scale=4.0, sampler=None, seeds=list(seeds),
                            cache=cache)

    return make


def images(engine: DiffusersEngine, jobs: list[InferenceJob]) -> list[list[Image.Image]]:
    collected = Collect(len(jobs))
    engine.run(jobs, collected)
    return [[made.image for made in results] for results in collected.results]


def one(engine: DiffusersEngine, job: InferenceJob) -> Image.Image:
    return images(engine, [job])[0][0]


def denoiser(engine: DiffusersEngine, job: InferenceJob) -> torch.nn.Module:
    pipe = engine.pipelines.text_to_image(job.model, job.weights)
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


CASES = [
    ("imagewire:tiny@1", deep()),
    ("imagewire:tiny@1", deep(branch=2)),
    ("imagewire:tiny@1", deep(interval=2, start=3, end=7)),
    ("imagewire:tiny-sdxl@1", deep()),
    ("imagewire:tiny-flux@1", first_block()),
    ("imagewire:tiny-sd3@1", first_block(max_consecutive=1)),
]


_UNCACHED: dict[str, bytes] = {}


def uncached(engine: DiffusersEngine, job: JobMaker, model: str) -> Image.Image:
    """The model's image without a cache, made once per module: the pipeline calls are what these tests cost."""
    if model not in _UNCACHED:
        _UNCACHED[model] = one(engine, job(model)).tobytes()
    return Image.frombytes("RGB", (128, 128), _UNCACHED[model])


@pytest.mark.parametrize(("model", "cache"), CASES, ids=[f"{m.split(':')[1]}-{i}" for i, (m, _) in enumerate(CASES)])
def test_a_cache_changes_the_image_a_little_and_repeats_exactly(engine, job, model, cache):
    plain = uncached(engine, job, model)
    cached = one(engine, job(model, cache))
    assert cached.tobytes() != plain.tobytes(), "the cache reused nothing"
    assert psnr(cached, plain) > 25
    assert one(engine, job(model, cache)).tobytes() == cached.tobytes()
    assert hooked_modules(denoiser(engine, job(model))) == []


def full_steps(engine: DiffusersEngine, job: InferenceJob) -> tuple[int, list[int]]:
    """How many steps the call made, and which of them ran the cached part of the denoiser."""
    model = denoiser(engine, job)
    calls: list[int] = []
    ran: list[int] = []
    if hasattr(model, "mid_block"):
        inner = model.mid_block.resnets[0]  # inside a replayed block: runs only when that block does
    else:
        blocks = [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]
        inner = next(iter(blocks[-1].children()))  # inside the tail block
    handles = [model.register_forward_pre_hook(lambda *_: calls.append(1)),
               inner.register_forward_pre_hook(lambda *_: ran.append(len(calls) - 1))]
    try:
        one(engine, job)
    finally:
        for handle in handles:
            handle.remove()
    return len(calls), sorted(set(ran))


def reuse_pattern(steps: int, cache: CacheSettings) -> list[int]:
    """The full steps DeepCache's settings call for: a full step every ``interval``, at most ``max_consecutive``
    reused in a row, and reuse only inside the window."""
    full, in_a_row = [], 0
    for step in range(steps):
        reuse = step > 0 and cache.start <= step < cache.end and in_a_row < min(cache.interval - 1,
                                                                                 cache.max_consecutive)
        in_a_row = in_a_row + 1 if reuse else 0
        if not reuse:
            full.append(step)
    return full


@pytest.mark.parametrize("cache", [deep(interval=4, max_consecutive=1), deep(start=4), deep(end=5),
                                   deep(interval=5, max_consecutive=3)],
                         ids=["consecutive-1", "start-4", "end-5", "capped"])
def test_deep_cache_runs_the_deep_blocks_exactly_where_its_settings_say(engine, job, cache):
    steps, ran = full_steps(engine, job(cache=cache))
    assert steps == STEPS + 1  # the tiny model's PNDM sampler runs one more step than asked
    assert ran == reuse_pattern(steps, cache)


@pytest.mark.parametrize("model", ["imagewire:tiny-flux@1", "imagewire:tiny-sd3@1"])
def test_first_block_cache_reuses_only_inside_the_window_and_a_limited_run(engine, job, model):
    cache = first_block(start=2, end=7, max_consecutive=2)
    steps, ran = full_steps(engine, job(model, cache))
    reused = [step for step in range(steps) if step not in ran]
    assert reused and all(cache.start <= step < cache.end for step in reused)
    run = longest = 0
    for step in range(steps):
        run = run + 1 if step in reused else 0
        longest = max(longest, run)
    assert longest <= cache.max_consecutive


def test_first_block_cache_at_distance_0_reuses_nothing(engine, job):
    steps, ran = full_steps(engine, job("imagewire:tiny-flux@1", first_block(threshold=0.0)))
    assert ran == list(range(steps))


class CancelAfterOneStep(Collect):
    def progress(self, index: int, step: Step) -> None:
        super().progress(index, step)
        self.cancel.add(index)


@pytest.mark.parametrize(("model", "cache"), [("imagewire:tiny@1", deep()), ("imagewire:tiny-flux@1", first_block())])
def test_the_hooks_come_off_when_a_call_is_stopped(engine, job, model, cache):
    with pytest.raises(Cancelled):
        engine.run([job(model, cache)], CancelAfterOneStep(1))
    assert hooked_modules(denoiser(engine, job(model))) == []
    # The pipeline is as loaded: the next call without a cache makes the uncached image.
    assert one(engine, job(model)).tobytes() == uncached(engine, job, model).tobytes()


def test_a_branch_deeper_than_the_unet_names_the_option_and_its_range(engine, job):
    with pytest.raises(InvalidParameter) as caught:
        one(engine, job(cache=deep(branch=4)))
    assert caught.value.parameter == "acceleratorOptions.deepCacheBranchId"
    assert "0 to 3" in caught.value.message and "received 4" in caught.value.message
    assert hooked_modules(denoiser(engine, job())) == []


@pytest.mark.parametrize(("architecture", "branches"), [("sd15", 12), ("sdxl", 9)])
def test_real_unets_have_their_skip_branches_paired(architecture, branches):
    from tests.checkpoints import _component

    unet = _component(architecture, "unet")  # on the meta device: shapes only
    down, up = skip_branches(unet)
    assert len(down) == len(up) == branches and down[0] == []
    # Every branch's up layer starts with a resnet that takes the skip beside the deeper path (concatenated, so
    # its input is wider than its output) and keeps the skip's resolution.
    for layers in up:
        assert layers[0].conv1.in_channels > layers[0].conv1.out_channels


def test_different_settings_never_share_a_call_and_equal_ones_do(engine, job):
    assert job(cache=deep()).batch_key() == job(cache=deep(), name="b", prompt="a blue bird").batch_key()
    for other in (None, deep(interval=2), deep(branch=1), deep(end=5), deep(max_consecutive=1)):
        assert job(cache=deep()).batch_key() != job(cache=other).batch_key()
    assert job("imagewire:tiny-flux@1", first_block()).batch_key() != \
        job("imagewire:tiny-flux@1", first_block(threshold=0.1)).batch_key()
    # Sharing a call gives each job the images it gets alone, cache and all.
    first, second = job(cache=deep(), seeds=(5,)), job(cache=deep(), seeds=(9,), name="b", prompt="a blue bird")
    together = images(engine, [first, second])
    assert psnr(together[0][0], one(engine, first)) > 40
