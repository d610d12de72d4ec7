"""The diffusers engine on the tiny model: images of several tasks in one pipeline call."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageChops

from air_registry.catalog import Catalog
from server.engine import DiffusersEngine
from server.scheduler import GeneratedImage, InferenceJob


@pytest.fixture
def engine(data_dir: Path) -> DiffusersEngine:
    return DiffusersEngine(device="cpu", data_dir=data_dir, allow_downloads=False, max_batch_size=4)


def job(name: str, prompt: str, seeds: list[int], init_image: Image.Image | None = None) -> InferenceJob:
    return InferenceJob(task_uuid=name, model=Catalog.load().resolve("imagewire:tiny@1"), prompt=prompt,
                        negative_prompt="blurry", width=128, height=128, steps=3, cfg_scale=7.0, scheduler=None,
                        seeds=seeds, init_image=init_image, strength=0.6)


def run(engine: DiffusersEngine, jobs: list[InferenceJob]) -> dict[str, list[GeneratedImage]]:
    """Run ``jobs`` in one engine call; each job's images by taskUUID, in emit order."""
    made: dict[str, list[GeneratedImage]] = {job.task_uuid: [] for job in jobs}
    engine.run(jobs, lambda index, images: made[jobs[index].task_uuid].extend(images))
    return made


def largest_difference(first: Image.Image, second: Image.Image) -> int:
    return max(high for _, high in ImageChops.difference(first, second).getextrema())


@pytest.mark.parametrize("image_to_image", [False, True], ids=["txt2img", "img2img"])
def test_jobs_sharing_a_call_get_the_images_they_would_get_alone(engine, image_to_image):
    seeds_a, seeds_b = ([5], [9, 10]) if not image_to_image else ([5], [5])
    init_a = Image.new("RGB", (128, 128), (200, 40, 90)) if image_to_image else None
    init_b = Image.new("RGB", (128, 128), (20, 160, 220)) if image_to_image else None
    together = run(engine, [job("a", "a red fox", seeds_a, init_a), job("b", "a blue bird", seeds_b, init_b)])
    alone_a = run(engine, [job("a", "a red fox", seeds_a, init_a)])["a"]
    alone_b = run(engine, [job("b", "a blue bird", seeds_b, init_b)])["b"]

    assert [(image.index, image.seed) for image in together["a"]] == [(0, seeds_a[0])]
    assert [(image.index, image.seed) for image in together["b"]] == list(enumerate(seeds_b))
    # Each image is its job's own (prompt, seed, seed image), up to last-bit rounding of batched maths.
    for shared, single in zip([*together["a"], *together["b"]], [*alone_a, *alone_b], strict=True):
        assert largest_difference(shared.image, single.image) <= 2
    assert largest_difference(together["a"][0].image, together["b"][0].image) > 2
    # The call's device time is shared among its three images.
    assert together["a"][0].seconds == together["b"][0].seconds > 0


def test_more_images_than_the_batch_size_are_split_across_calls(engine):
    calls: list[int] = []
    jobs = [job("a", "a red fox", [1, 2, 3]), job("b", "a blue bird", [4, 5])]
    engine.run(jobs, lambda index, images: calls.append(len(images)))
    # Four images fit one call (a's three, b's first); b's last comes in a second call.
    assert calls == [3, 1, 1]
