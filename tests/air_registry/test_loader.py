from __future__ import annotations

import dataclasses
import gc
import logging
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from imagewire.air_registry.catalog import Catalog, ModelEntry
from imagewire.air_registry.errors import WeightsMissing
from imagewire.air_registry.loader import PipelineCache, placement_of, resolve_device
from imagewire.air_registry.memory_plan import (
    ALL_ON_DEVICE,
    MODEL_OFFLOAD,
    PLACEMENTS,
    SEQUENTIAL_OFFLOAD,
    TEXT_ENCODERS_ON_CPU,
    ModelTooLarge,
    peak_of,
    read_sizes,
)
from imagewire.tasks.inputs import task_error

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]


def generate(pipe: Any, seed: int, **arguments: Any) -> np.ndarray:
    image = pipe(
        "a red bicycle",
        num_inference_steps=4,
        generator=torch.Generator("cpu").manual_seed(seed),
        **arguments,
    ).images[0]
    assert isinstance(image, Image.Image)
    return np.asarray(image)


def folder_copy_of(tiny_entry: ModelEntry, tiny_model_dir: Path, air: str) -> ModelEntry:
    """The tiny model's weights under another catalog entry: a second model to fill the cache with."""
    return dataclasses.replace(tiny_entry, air=air, source="folder", location=str(tiny_model_dir))


# ---------------------------------------------------------------- devices


def test_auto_picks_cuda_only_where_there_is_one() -> None:
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(" CPU ") == "cpu"


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda0", "mps", ""])
def test_malformed_devices_are_an_operator_error(name: str) -> None:
    with pytest.raises(ValueError, match="device"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_cuda_device_is_an_operator_error() -> None:
    with pytest.raises(ValueError, match="no usable CUDA device"):
        resolve_device("cuda:0")


def test_models_run_in_float32_on_the_cpu_and_in_their_own_half_precision_on_cuda(
    tmp_path: Path, catalog: Catalog
) -> None:
    cpu, cuda = PipelineCache(device="cpu", data_dir=tmp_path), PipelineCache(device="cuda:1", data_dir=tmp_path)
    for air in ("imagewire:sd15@1", "runware:101@1", "imagewire:sd35-large@1"):
        assert cpu.dtype_of(catalog.resolve(air)) == torch.float32
    assert cuda.dtype_of(catalog.resolve("imagewire:sd15@1")) == torch.float16
    assert cuda.dtype_of(catalog.resolve("runware:5@1")) == torch.float16  # SD 3 medium shipped in fp16
    assert cuda.dtype_of(catalog.resolve("runware:101@1")) == torch.bfloat16
    assert cuda.dtype_of(catalog.resolve("imagewire:sd35-large@1")) == torch.bfloat16
    with pytest.raises(ValueError, match="max_loaded"):
        PipelineCache(device="cpu", data_dir=tmp_path, max_loaded=0)


# ---------------------------------------------------------------- text-to-image and image-to-image


def test_text_to_image_makes_images_of_the_asked_size_repeatably(
    pipelines: PipelineCache, tiny_entry: ModelEntry
) -> None:
    pipe = pipelines.text_to_image(tiny_entry)
    assert pipelines.text_to_image(tiny_entry) is pipe
    first = generate(pipe, 42, width=128, height=128)
    assert first.shape == (128, 128, 3)
    assert np.array_equal(generate(pipe, 42, width=128, height=128), first)
    assert not np.array_equal(generate(pipe, 43, width=128, height=128), first)
    assert generate(pipe, 1, width=192, height=128).shape == (128, 192, 3)


def test_image_to_image_shares_the_weights_of_text_to_image(
    pipelines: PipelineCache, tiny_entry: ModelEntry
) -> None:
    text_to_image = pipelines.text_to_image(tiny_entry)
    image_to_image = pipelines.image_to_image(tiny_entry)
    assert pipelines.image_to_image(tiny_entry) is image_to_image
    assert type(image_to_image).__name__ == "StableDiffusionImg2ImgPipeline"
    assert image_to_image.unet is text_to_image.unet
    assert image_to_image.vae is text_to_image.vae
    assert image_to_image.text_encoder is text_to_image.text_encoder

    source = Image.fromarray(generate(text_to_image, 5, width=128, height=128))
    first = generate(image_to_image, 9, image=source, strength=0.6)
    assert first.shape == (128, 128, 3)
    assert np.array_equal(generate(image_to_image, 9, image=source, strength=0.6), first)


def test_per_step_progress_bars_are_off(pipelines: PipelineCache, tiny_entry: ModelEntry) -> None:
    assert pipelines.text_to_image(tiny_entry)._progress_bar_config == {"disable": True}
    assert pipelines.image_to_image(tiny_entry)._progress_bar_config == {"disable": True}


# ---------------------------------------------------------------- loading, caching, failures


def test_loading_logs_where_from_and_how_long(
    tiny_entry: ModelEntry, tiny_data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir)
    with caplog.at_level(logging.INFO, logger="imagewire.air_registry.loader"):
        cache.text_to_image(tiny_entry)
    messages = [record.getMessage() for record in caplog.records if record.name == "imagewire.air_registry.loader"]
    assert messages[0].startswith("loading model imagewire:tiny@1 from the embedded model on cpu: plan all-on-device")
    assert messages[1].startswith("loaded model imagewire:tiny@1 in ")


def test_the_embedded_model_is_built_on_first_use(tiny_entry: ModelEntry, tmp_path: Path) -> None:
    cache = PipelineCache(device="cpu", data_dir=tmp_path)
    cache.text_to_image(tiny_entry)
    assert (tmp_path / "models" / "imagewire-tiny-1" / "model_index.json").is_file()


def test_the_least_recently_used_model_is_evicted_and_freed(
    tiny_entry: ModelEntry, tiny_model_dir: Path, tiny_data_dir: Path
) -> None:
    first = folder_copy_of(tiny_entry, tiny_model_dir, "test:first@1")
    second = folder_copy_of(tiny_entry, tiny_model_dir, "test:second@1")
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir, max_loaded=1)

    first_unet = weakref.ref(cache.text_to_image(first).unet)
    cache.image_to_image(first)
    assert cache.loaded_models == ["test:first@1"]
    cache.text_to_image(second)
    assert cache.loaded_models == ["test:second@1"]
    gc.collect()
    assert first_unet() is None

    cache.unload_all()
    assert cache.loaded_models == []


def test_a_larger_cache_keeps_models_in_recency_order(
    tiny_entry: ModelEntry, tiny_model_dir: Path, tiny_data_dir: Path
) -> None:
    entries = [folder_copy_of(tiny_entry, tiny_model_dir, f"test:m{i}@1") for i in range(3)]
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir, max_loaded=2)
    kept = cache.text_to_image(entries[0])
    cache.text_to_image(entries[1])
    assert cache.text_to_image(entries[0]) is kept  # touching it makes m1 the oldest
    cache.text_to_image(entries[2])
    assert cache.loaded_models == ["test:m0@1", "test:m2@1"]


def test_a_refiner_has_no_text_to_image_pipeline(catalog: Catalog, tmp_path: Path) -> None:
    # Requests are refused before they reach the device (tests/tasks/test_image_inference.py);
    # asking the cache is a caller's bug, found before any weights are read.
    cache = PipelineCache(device="cpu", data_dir=tmp_path)
    with pytest.raises(ValueError, match="only does image-to-image"):
        cache.text_to_image(catalog.resolve("sdxl-refiner-1.0"))
    assert cache.loaded_models == []


def test_missing_weights_raise_model_not_found(
    catalog: Catalog, empty_hf_cache: Path, tmp_path: Path
) -> None:
    cache = PipelineCache(device="cpu", data_dir=tmp_path)
    with pytest.raises(WeightsMissing, match="stable-diffusion-v1-5/stable-diffusion-v1-5"):
        cache.text_to_image(catalog.resolve("sd15"))
    assert cache.loaded_models == []


def test_weights_that_cannot_be_loaded_raise_model_not_found(tiny_entry: ModelEntry, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers"', "utf-8"
    )
    entry = dataclasses.replace(tiny_entry, air="test:broken@1", source="folder", location=str(broken))
    cache = PipelineCache(device="cpu", data_dir=tmp_path)
    with pytest.raises(WeightsMissing) as caught:
        cache.text_to_image(entry)
    message = task_error(caught.value, "model").message
    assert message.startswith(
        f"the weights of {entry.name} (test:broken@1) at {broken} could not be loaded ("
    )
    assert "Traceback" not in message
    assert caught.value.__cause__ is not None
    assert cache.loaded_models == []


# ---------------------------------------------------------------- host RAM, and models a job needs together


def test_models_moved_off_the_device_wait_in_host_ram_and_come_back_without_a_load(
    tiny_entry: ModelEntry, tiny_model_dir: Path, tiny_data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second, third = (folder_copy_of(tiny_entry, tiny_model_dir, f"test:ram{i}@1") for i in range(3))
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir, max_loaded=1, ram_models=1)
    pipe = cache.text_to_image(first)
    image = generate(pipe, 3, width=128, height=128)
    cache.text_to_image(second)
    assert cache.loaded_models == ["test:ram1@1"]
    assert cache.memory == {"test:ram0@1": "ram", "test:ram1@1": "device"}
    with caplog.at_level(logging.INFO, logger="imagewire.air_registry.loader"):
        back = cache.text_to_image(first)
    messages = [record.getMessage() for record in caplog.records]
    assert back is pipe and not any(message.startswith("loading model") for message in messages)
    assert any(message.startswith("moved model test:ram0@1 from host RAM to cpu") for message in messages)
    assert np.array_equal(generate(back, 3, width=128, height=128), image)
    assert cache.memory == {"test:ram1@1": "ram", "test:ram0@1": "device"}
    # A third model pushes the least recently used out of RAM altogether.
    cache.text_to_image(third)
    assert cache.memory == {"test:ram0@1": "ram", "test:ram2@1": "device"}


def test_a_model_a_job_keeps_stays_on_the_device_while_the_next_loads(
    tiny_entry: ModelEntry, tiny_model_dir: Path, tiny_data_dir: Path
) -> None:
    base, refiner, other = (folder_copy_of(tiny_entry, tiny_model_dir, f"test:pair{i}@1") for i in range(3))
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir, max_loaded=1)
    cache.text_to_image(base)
    cache.image_to_image(refiner, keep=[base.air])
    assert cache.loaded_models == ["test:pair0@1", "test:pair1@1"]  # one over the limit while the job runs
    cache.text_to_image(other)
    assert cache.loaded_models == ["test:pair2@1"]                   # and back to it after
    with pytest.raises(ValueError, match="ram_models"):
        PipelineCache(device="cpu", data_dir=tiny_data_dir, ram_models=-1)


# ---------------------------------------------------------------- memory plans


def _budget_for(placement: str, cache: PipelineCache, entry: ModelEntry, folder: Path) -> int:
    """The smallest budget ``placement`` fits in for ``entry``: every faster placement needs more."""
    unbounded = cache.plan(entry, folder)
    size = read_sizes(folder, 4)
    assert size is not None
    return peak_of(placement, size, unbounded.activation_bytes)[1]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_budget_below_the_models_size_still_runs_with_the_plan_the_log_names(
    placement: str, tiny_entry: ModelEntry, tiny_model_dir: Path, tiny_data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    entry = folder_copy_of(tiny_entry, tiny_model_dir, f"test:{placement}@1")
    unbounded = PipelineCache(device="cpu", data_dir=tiny_data_dir)
    budget = _budget_for(placement, unbounded, entry, tiny_model_dir)
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir, memory_budget=budget)
    with caplog.at_level(logging.INFO, logger="imagewire.air_registry.loader"):
        pipe = cache.text_to_image(entry)
    [line] = [record.getMessage() for record in caplog.records if record.getMessage().startswith("loading model")]
    assert f": plan {placement} on cpu: weights " in line
    assert placement_of(pipe) == placement and cache.plans[entry.air].placement == placement
    # The placement is really in force: its hooks moved the modules in (a CPU's "device" is the CPU itself).
    if placement == TEXT_ENCODERS_ON_CPU:
        assert getattr(pipe.text_encoder, "_imagewire_encodes", 0) == 0
    elif placement == MODEL_OFFLOAD:
        assert hasattr(pipe.unet, "_hf_hook")
    elif placement == SEQUENTIAL_OFFLOAD:
        assert getattr(pipe.unet, "_diffusers_hook", None) is not None
    image = generate(pipe, 11, width=64, height=64)
    if placement == TEXT_ENCODERS_ON_CPU:
        assert pipe.text_encoder._imagewire_encodes >= 1
    # Where the weights wait changes nothing in the image.
    reference = generate(unbounded.text_to_image(entry), 11, width=64, height=64)
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1
    # Image-to-image shares the placed modules.
    init = Image.fromarray(reference)
    assert generate(cache.image_to_image(entry), 12, image=init, strength=0.5).shape == reference.shape


def test_a_budget_no_placement_fits_refuses_the_load_saying_what_it_needs(
    tiny_entry: ModelEntry, tiny_model_dir: Path, tiny_data_dir: Path
) -> None:
    entry = folder_copy_of(tiny_entry, tiny_model_dir, "test:too-large@1")
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir, memory_budget=1024 * 1024)
    with pytest.raises(ModelTooLarge, match="does not fit this device: its weights take") as refused:
        cache.text_to_image(entry)
    assert "sequential-offload, would need" in task_error(refused.value, "model").message
    assert cache.loaded_models == []


def test_models_that_fit_together_stay_together_and_one_that_does_not_fit_beside_them_evicts_them(
    tiny_entry: ModelEntry, tiny_model_dir: Path, tiny_data_dir: Path
) -> None:
    first, second, third = (folder_copy_of(tiny_entry, tiny_model_dir, f"test:fit{i}@1") for i in range(3))
    one = _budget_for(ALL_ON_DEVICE, PipelineCache(device="cpu", data_dir=tiny_data_dir), first, tiny_model_dir)
    size = read_sizes(tiny_model_dir, 4)
    assert size is not None
    # Room for two models' weights and one call: both stay, all on the device.
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir, max_loaded=3, memory_budget=one + size.total)
    cache.text_to_image(first)
    cache.text_to_image(second)
    assert cache.loaded_models == ["test:fit0@1", "test:fit1@1"]
    assert {plan.placement for plan in cache.plans.values()} == {ALL_ON_DEVICE}
    # A third does not fit beside both: the least recently used leaves first, and it loads all on the device.
    cache.text_to_image(third)
    assert cache.loaded_models == ["test:fit1@1", "test:fit2@1"]
    assert cache.plans["test:fit2@1"].placement == ALL_ON_DEVICE
    # Room for one: each model evicts the other, whatever --max-loaded-models allows.
    single = PipelineCache(device="cpu", data_dir=tiny_data_dir, max_loaded=3, memory_budget=one)
    single.text_to_image(first)
    single.text_to_image(second)
    assert single.loaded_models == ["test:fit1@1"]


def test_a_vae_swapped_into_an_offloaded_model_is_on_the_device_for_its_calls(
    catalog: Catalog, tiny_entry: ModelEntry, tiny_model_dir: Path, tiny_data_dir: Path, models_dir: Path
) -> None:
    from imagewire.air_registry.weights import locate_weights
    from imagewire.tasks.jobs import AddOn

    entry = folder_copy_of(tiny_entry, tiny_model_dir, "test:offloaded-vae@1")
    budget = _budget_for(MODEL_OFFLOAD, PipelineCache(device="cpu", data_dir=tiny_data_dir), entry, tiny_model_dir)
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir, memory_budget=budget)
    pipe = cache.text_to_image(entry)
    vae_entry = catalog.resolve("tiny-vae")
    moved: list[str] = []
    vae = AddOn(vae_entry, locate_weights(vae_entry, data_dir=tiny_data_dir, allow_downloads=False))
    original_to = torch.nn.Module.to

    def recording_to(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if module is pipe.vae:
            moved.append(str(args[0] if args else kwargs.get("device")))
        return original_to(module, *args, **kwargs)

    torch.nn.Module.to = recording_to  # type: ignore[method-assign]
    try:
        cache.use_add_ons(entry, vae=vae)
    finally:
        torch.nn.Module.to = original_to  # type: ignore[method-assign]
    # Not hooked by the model offload: moved to the device (a CPU's device is "cpu") rather than left alone.
    assert not hasattr(pipe.vae, "_hf_hook") and moved == ["cpu"]
    assert generate(pipe, 3, width=64, height=64).shape == (64, 64, 3)
