"""Bounded decode memory: the engine decodes image by image, then in tiles, when a call's decode would not fit
what the model's memory plan leaves beside its weights; a tiled decode gives the image an untiled one does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from imagewire.air_registry.catalog import Catalog
from imagewire.air_registry.memory_plan import FIXED_OVERHEAD, decode_bytes
from imagewire.air_registry.weights import locate_weights
from imagewire.server.engine import DiffusersEngine
from imagewire.tasks.jobs import InferenceJob
from tests.engines import Collect, diffusers_engine

TINY = Catalog.load().resolve("imagewire:tiny@1")
SIDE = 512          # above the smallest tile side (256), so that tiling has tiles to make
FLOAT32 = 4


def engine_with_headroom(data_dir: Path, headroom: int | None) -> DiffusersEngine:
    """An engine whose tiny model's plan leaves ``headroom`` bytes beside its weights (None: no budget)."""
    if headroom is None:
        return diffusers_engine(data_dir, max_batch_size=2)
    probe = diffusers_engine(data_dir, max_batch_size=2)
    weights = probe.pipelines.plan(TINY, locate_weights(TINY, data_dir=data_dir, allow_downloads=False))
    budget = headroom + weights.resident_bytes + FIXED_OVERHEAD
    return diffusers_engine(data_dir, max_batch_size=2, device_memory_bytes=budget)


def make(data_dir: Path, engine: DiffusersEngine, seeds: list[int]) -> list[np.ndarray]:
    weights = locate_weights(TINY, data_dir=data_dir, allow_downloads=False)
    job = InferenceJob(task_uuid="decode", model=TINY, weights=weights, prompt="a lighthouse", negative_prompt="",
                       width=SIDE, height=SIDE, steps=2, cfg_scale=7.0, sampler=None, seeds=seeds)
    collected = Collect(1)
    engine.run([dataclasses.replace(job)], collected)
    return [np.asarray(image.image, dtype=np.int16) for image in collected.results[0]]


def vae_of(engine: DiffusersEngine):
    return engine.pipelines.text_to_image(TINY).vae


@pytest.mark.parametrize(("below", "slicing"), [(0, False), (1, True)], ids=["at", "below"])
def test_slicing_switches_on_below_the_threshold_of_the_whole_batch(data_dir: Path, below: int, slicing: bool):
    engine = engine_with_headroom(data_dir, decode_bytes(2, SIDE, SIDE, FLOAT32) - below)
    make(data_dir, engine, [1, 2])
    assert (vae_of(engine).use_slicing, vae_of(engine).use_tiling) == (slicing, False)


def test_a_tiled_decode_gives_the_untiled_image(data_dir: Path):
    unbounded = engine_with_headroom(data_dir, None)
    whole, other_seed = make(data_dir, unbounded, [7])[0], make(data_dir, unbounded, [8])[0]
    # Less than one image's decode: tiles.
    tight = engine_with_headroom(data_dir, decode_bytes(1, SIDE, SIDE, FLOAT32) - 1)
    tiled = make(data_dir, tight, [7])
    vae = vae_of(tight)
    assert vae.use_tiling and vae.tile_sample_min_size == 256
    difference = np.abs(tiled[0] - whole)
    # Tiles overlap and are blended, so pixels differ a little from one whole decode (on the tiny model's
    # random VAE, about 2 levels of 255 on average): far less than another seed's image does.
    assert 0 < difference.mean() < 3.0, difference.mean()
    assert difference.mean() * 5 < np.abs(other_seed - whole).mean()
