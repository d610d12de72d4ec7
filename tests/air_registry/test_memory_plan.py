"""Memory plans on real shapes with made-up device sizes: FLUX.1 [dev], SDXL and SDXL with its refiner, their
parameters counted from the published configs on the meta device (no weights in RAM), and the decode rule."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from bench.gpu_models import meta_size
from imagewire.air_registry.memory_plan import (
    ALL_ON_DEVICE,
    DENOISER,
    GIB,
    MODEL_OFFLOAD,
    SEQUENTIAL_OFFLOAD,
    TEXT_ENCODER,
    TEXT_ENCODERS_ON_CPU,
    VAE,
    Activations,
    ModelSize,
    ModelTooLarge,
    decode_bytes,
    decode_mode,
    plan_placement,
    read_sizes,
)


@functools.cache
def size_of(architecture: str) -> ModelSize:
    return meta_size(architecture)


def flux_activations(batch: int) -> int:
    # FLUX.1 [dev] is guidance-distilled: one latent per image.
    return Activations(batch=batch, width=1024, height=1024, copies=1).total("transformer")


def sdxl_activations(batch: int) -> int:
    return Activations(batch=batch, width=1024, height=1024).total("unet")


def test_the_real_shapes_weigh_what_the_published_models_do():
    flux = size_of("flux")
    # 11.9B transformer and 4.7B T5 XXL in bfloat16: about 34 GB together with CLIP and the VAE.
    assert 31 * GIB < flux.total < 32.5 * GIB
    assert 22 * GIB < sum(part.bytes for part in flux.of(DENOISER)) < 22.5 * GIB
    assert 9 * GIB < max(part.bytes for part in flux.of(TEXT_ENCODER)) < 9.3 * GIB
    assert flux.denoiser_kind == "transformer"
    assert 6.2 * GIB < size_of("sdxl").total < 6.7 * GIB   # 2.6B UNet, CLIP L and OpenCLIP bigG
    assert size_of("sdxl").denoiser_kind == "unet"


def test_flux_dev_on_an_80_gb_card_is_all_on_the_device():
    plan = plan_placement(size_of("flux"), budget=80 * GIB, activations=flux_activations(4))
    assert plan.placement == ALL_ON_DEVICE
    assert plan.resident_bytes == plan.model_bytes == size_of("flux").total
    assert plan.rejected == ()


def test_flux_dev_on_a_24_gb_card_is_offloaded_model_by_model():
    plan = plan_placement(size_of("flux"), budget=24 * GIB, activations=flux_activations(1))
    # The text encoders off the device are not enough (the transformer and the VAE alone are 22 GiB, and
    # T5 comes in to encode); whole components moved in one at a time are.
    assert plan.placement == MODEL_OFFLOAD
    assert [name for name, _ in plan.rejected] == [ALL_ON_DEVICE, TEXT_ENCODERS_ON_CPU]
    assert plan.peak_bytes <= 24 * GIB and plan.resident_bytes == 0
    assert "plan model-offload" in plan.describe() and "all-on-device would need 32.9 GiB" in plan.describe()


def test_flux_dev_on_a_32_gb_card_keeps_the_transformer_and_moves_the_text_encoders_in_to_encode():
    plan = plan_placement(size_of("flux"), budget=32 * GIB, activations=flux_activations(1))
    assert plan.placement == TEXT_ENCODERS_ON_CPU
    assert plan.resident_bytes == size_of("flux").total - sum(part.bytes for part in size_of("flux").of(TEXT_ENCODER))


def test_flux_dev_on_an_8_gb_card_streams_blocks_and_below_that_is_refused_with_what_it_needs():
    plan = plan_placement(size_of("flux"), budget=8 * GIB, activations=flux_activations(1))
    assert plan.placement == SEQUENTIAL_OFFLOAD
    assert plan.peak_bytes <= 8 * GIB
    with pytest.raises(ModelTooLarge) as refused:
        plan_placement(size_of("flux"), budget=2 * GIB, activations=flux_activations(1), label="FLUX.1 [dev]")
    message = str(refused.value)
    assert message.startswith("FLUX.1 [dev] does not fit this device: its weights take 31.7 GiB")
    assert "2.0 GiB is available" in message
    assert "The lightest placement, sequential-offload, would need" in message


def test_the_largest_batch_decides_between_placements():
    # A 24 GB card fits one FLUX image per call with model offload, but not four: then only blocks streamed in fit.
    assert plan_placement(size_of("flux"), budget=24 * GIB, activations=flux_activations(4)).placement == \
        SEQUENTIAL_OFFLOAD


def test_sdxl_with_its_refiner_on_a_12_gb_card():
    pair = ModelSize.of_models([size_of("sdxl"), size_of("sdxl_refiner")])
    assert 11.5 * GIB < pair.total < 12.5 * GIB   # more than the card, before any activation
    # One image per call: both denoisers and VAEs stay, the three text encoders come in to encode.
    assert plan_placement(pair, budget=12 * GIB, activations=sdxl_activations(1)).placement == TEXT_ENCODERS_ON_CPU
    # Four: the components take turns on the device.
    assert plan_placement(pair, budget=12 * GIB, activations=sdxl_activations(4)).placement == MODEL_OFFLOAD
    # SDXL alone fits all on the device.
    assert plan_placement(size_of("sdxl"), budget=12 * GIB, activations=sdxl_activations(1)).placement == \
        ALL_ON_DEVICE


def test_without_a_budget_everything_is_on_the_device():
    plan = plan_placement(size_of("flux"), budget=None, activations=flux_activations(4), device="cpu")
    assert plan.placement == ALL_ON_DEVICE and plan.headroom is None
    assert "of no limit" in plan.describe()


def test_the_decode_rule_switches_at_the_threshold():
    whole = decode_bytes(4, 2048, 2048)
    one = decode_bytes(1, 2048, 2048)
    assert decode_mode(None, 4, 2048, 2048).name == "whole"
    assert decode_mode(whole, 4, 2048, 2048).name == "whole"
    assert decode_mode(whole - 1, 4, 2048, 2048).name == "sliced"
    assert decode_mode(one, 4, 2048, 2048).name == "sliced"
    tiled = decode_mode(one - 1, 4, 2048, 2048)
    assert tiled.name == "sliced+tiled" and tiled.tile_side == 1024
    # Tiles as large as fit, down to the smallest.
    assert decode_mode(decode_bytes(1, 1024, 1024) - 1, 1, 2048, 2048).tile_side == 512
    assert decode_mode(0, 1, 2048, 2048).tile_side == 256
    # One image is never "sliced".
    assert decode_mode(one - 1, 1, 2048, 2048).name == "tiled"


def test_sizes_read_from_a_folders_headers_are_its_modules_parameters(tiny_model_dir: Path):
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    size = read_sizes(tiny_model_dir, 4)
    assert size is not None
    pipe = DiffusionPipeline.from_pretrained(str(tiny_model_dir))
    for part in size.components:
        module = getattr(pipe, part.name)
        assert isinstance(module, torch.nn.Module)
        assert part.bytes == sum(tensor.numel() * 4 for tensor in module.state_dict().values()), part.name
    assert {part.role for part in size.components} == {DENOISER, TEXT_ENCODER, VAE}
    # In half precision, half the bytes.
    half = read_sizes(tiny_model_dir, 2)
    assert half is not None and half.total * 2 == size.total


def test_sizes_of_a_single_file_are_grouped_by_the_original_layout(tmp_path: Path):
    from tests.checkpoints import write_tiny_sd_checkpoint

    path = write_tiny_sd_checkpoint(tmp_path / "tiny.safetensors")
    size = read_sizes(path, 2)
    assert size is not None
    assert {part.role for part in size.components} == {DENOISER, TEXT_ENCODER, VAE}
    assert size.denoiser_kind == "unet"
    assert read_sizes(tmp_path / "missing.safetensors", 2) is None
