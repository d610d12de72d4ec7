"""Compiled denoisers (``--compile``): the same images as eager ones, and no compiling in service after the
warm-up that runs as the model loads."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from imagewire.air_registry import compile as compiling
from imagewire.air_registry.catalog import ModelEntry, parse_entry
from imagewire.air_registry.errors import CatalogError
from imagewire.air_registry.loader import PipelineCache

# Importing torch's compiler defines a TorchScript class, which warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def generate(pipe: Any, seed: int, batch: int = 1, **arguments: Any) -> np.ndarray:
    arguments.setdefault("num_inference_steps", 3)
    with torch.inference_mode():  # as the engine calls pipelines
        image = pipe(["a red bicycle"] * batch, generator=torch.Generator("cpu").manual_seed(seed),
                     **arguments).images
    return np.stack([np.asarray(each, dtype=np.int16) for each in image])


@pytest.fixture(scope="module")
def eager(tiny_data_dir: Path) -> PipelineCache:
    return PipelineCache(device="cpu", data_dir=tiny_data_dir, max_batch_size=3)


@pytest.fixture(scope="module")
def compiled(tiny_data_dir: Path, tiny_entry: ModelEntry) -> tuple[PipelineCache, int]:
    """A cache compiling on load, with the tiny model loaded (and warmed up), and the graphs that took."""
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir, max_batch_size=3, compile_denoisers=True)
    before = compiling.graphs_compiled()
    cache.load(tiny_entry)
    return cache, compiling.graphs_compiled() - before


def test_the_warm_up_compiles_what_service_needs_and_service_compiles_nothing(
    compiled: tuple[PipelineCache, int], eager: PipelineCache, tiny_entry: ModelEntry
) -> None:
    cache, warm_up_graphs = compiled
    assert warm_up_graphs > 0
    pipe = cache.text_to_image(tiny_entry)
    assert any(block._compiled_call_impl is not None for block in pipe.unet.modules())
    before = compiling.graphs_compiled()
    # A mixed run: sizes, batches and guidance the warm-up did not use, and image-to-image on the same blocks.
    for seed, (width, height, batch, guidance) in enumerate(
            [(64, 64, 1, 7.0), (192, 128, 3, 7.0), (128, 192, 2, 1.0), (320, 256, 1, 1.0), (128, 128, 3, 3.0)]):
        image = generate(pipe, seed, batch, width=width, height=height, guidance_scale=guidance)
        assert image.shape == (batch, height, width, 3)
    source = Image.new("RGB", (128, 128), (90, 140, 200))
    generate(cache.image_to_image(tiny_entry), 7, 2, image=[source] * 2, strength=0.6)
    assert compiling.graphs_compiled() == before


def test_compiled_images_equal_eager_ones(
    compiled: tuple[PipelineCache, int], eager: PipelineCache, tiny_entry: ModelEntry
) -> None:
    cache, _ = compiled
    for arguments in ({"width": 128, "height": 128}, {"width": 192, "height": 64, "batch": 2}):
        fast = generate(cache.text_to_image(tiny_entry), 11, **arguments)
        slow = generate(eager.text_to_image(tiny_entry), 11, **arguments)
        # The compiler may fuse and reorder float arithmetic: a level or two, never a different image.
        assert np.abs(fast - slow).max() <= 2
        assert not np.array_equal(fast, generate(eager.text_to_image(tiny_entry), 12, **arguments))


def test_a_catalog_entry_decides_for_itself(tiny_data_dir: Path, tiny_entry: ModelEntry,
                                            tiny_model_dir: Path) -> None:
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir, compile_denoisers=True)
    assert cache.compiles(tiny_entry)
    assert not cache.compiles(dataclasses.replace(tiny_entry, compile=False))
    assert PipelineCache(device="cpu", data_dir=tiny_data_dir).compiles(dataclasses.replace(tiny_entry, compile=True))
    raw = {"air": "local:compiled@1", "name": "compiled", "architecture": tiny_entry.architecture,
           "category": "checkpoint", "source": "folder", "location": str(tiny_model_dir)}
    assert parse_entry({**raw, "compile": True}, tiny_model_dir.parent).compile is True
    with pytest.raises(CatalogError, match="'compile' must be true or false, not 'yes'"):
        parse_entry({**raw, "compile": "yes"}, tiny_model_dir.parent)


def test_a_compiler_failure_leaves_the_model_running_eagerly(
    tiny_data_dir: Path, tiny_entry: ModelEntry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr("imagewire.air_registry.loader.warm_up", broken)
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir, compile_denoisers=True)
    with caplog.at_level(logging.WARNING, logger="imagewire.air_registry.loader"):
        pipe = cache.text_to_image(tiny_entry)
    assert all(block._compiled_call_impl is None for block in pipe.unet.modules())
    assert ("not compiling imagewire:tiny@1: the compiler failed (RuntimeError: no C++ compiler found more detail)"
            in caplog.text)
    assert generate(pipe, 1, width=64, height=64).shape == (1, 64, 64, 3)
