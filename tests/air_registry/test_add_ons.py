"""Add-ons from each source a catalog entry can name (hub, folder, single file), loaded by the real loading
code into a model in the cache, from the embedded tiny files."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from imagewire.air_registry.catalog import Catalog, ModelEntry
from imagewire.air_registry.errors import AddOnUnusable
from imagewire.air_registry.loader import PipelineCache
from imagewire.air_registry.weights import locate_weights
from imagewire.tasks.jobs import AddOn
from tests.air_registry.test_weights import fake_hub_snapshot


@pytest.fixture
def cache(tiny_data_dir: Path) -> PipelineCache:
    return PipelineCache(device="cpu", data_dir=tiny_data_dir)


def located(entry: ModelEntry, data_dir: Path, weight: float = 1.0) -> AddOn:
    return AddOn(entry, locate_weights(entry, data_dir=data_dir, allow_downloads=False), weight)


def test_a_lora_from_the_hub_cache_and_a_vae_from_a_folder_load_into_the_model(
    catalog: Catalog, cache: PipelineCache, tiny_entry: ModelEntry, models_dir: Path, empty_hf_cache: Path,
    tmp_path: Path,
) -> None:
    snapshot = fake_hub_snapshot(empty_hf_cache, "someone/tiny-lora", with_model_index=False)
    shutil.copy(models_dir / "imagewire-tiny-lora-1" / "pytorch_lora_weights.safetensors",
                snapshot / "style.safetensors")
    lora = dataclasses.replace(catalog.resolve("tiny-lora"), air="hub:lora@1", source="hub",
                               location="someone/tiny-lora")
    folder = shutil.copytree(models_dir / "imagewire-tiny-vae-1", tmp_path / "my-vae")
    vae = dataclasses.replace(catalog.resolve("tiny-vae"), air="folder:vae@1", source="folder", location=str(folder))

    pipe = cache.text_to_image(tiny_entry)
    own_vae = pipe.vae
    cache.use_add_ons(tiny_entry, loras=[located(lora, tmp_path, 0.7)], vae=located(vae, tmp_path))
    assert pipe.get_list_adapters()["unet"] == ["lora_hub_lora_1"]
    assert pipe.vae is not own_vae and torch.equal(
        pipe.vae.decoder.conv_out.weight.detach(),
        type(own_vae).from_pretrained(folder).decoder.conv_out.weight.detach())
    assert cache.memory == {tiny_entry.air: "device", "hub:lora@1": "device", "folder:vae@1": "device"}
    cache.use_add_ons(tiny_entry)
    assert pipe.vae is own_vae


def test_a_vae_with_other_latents_is_refused(catalog: Catalog, cache: PipelineCache, tiny_entry: ModelEntry,
                                             tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    folder = tmp_path / "wide-vae"
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=16).save_pretrained(folder)
    wide = dataclasses.replace(catalog.resolve("tiny-vae"), air="test:wide@1", source="folder", location=str(folder))
    cache.text_to_image(tiny_entry)
    with pytest.raises(AddOnUnusable) as caught:
        cache.use_add_ons(tiny_entry, vae=located(wide, tmp_path))
    assert caught.value.air == "test:wide@1" and "16-channel latents" in caught.value.problem


def test_an_embedding_file_that_is_not_one_is_refused(catalog: Catalog, cache: PipelineCache,
                                                      tiny_entry: ModelEntry, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, str(path))
    broken = dataclasses.replace(catalog.resolve("tiny-embedding"), air="test:two@1", source="single_file",
                                 location=str(path))
    cache.text_to_image(tiny_entry)
    with pytest.raises(AddOnUnusable, match="holds 2 tensors"):
        cache.use_add_ons(tiny_entry, embeddings=[AddOn(broken, path)])


def test_a_single_file_vae_loads_offline_with_the_models_own_config(
        catalog: Catalog, cache: PipelineCache, tiny_entry: ModelEntry, models_dir: Path, tmp_path: Path,
        empty_hf_cache: Path) -> None:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from safetensors.torch import save_file

    from tests.checkpoints import _vae

    folder_vae = AutoencoderKL.from_pretrained(models_dir / "imagewire-tiny-vae-1")
    # A VAE file as ComfyUI's vae/ folder keeps them: the original layout, without the checkpoint's prefix.
    state = {key.removeprefix("first_stage_model."): tensor.contiguous() for key, tensor in _vae(folder_vae).items()}
    save_file(state, str(tmp_path / "vae.safetensors"))
    vae = dataclasses.replace(catalog.resolve("tiny-vae"), air="file:vae@1", source="single_file",
                              location=str(tmp_path / "vae.safetensors"))
    pipe = cache.text_to_image(tiny_entry)
    cache.use_add_ons(tiny_entry, vae=located(vae, tmp_path))
    assert torch.equal(pipe.vae.decoder.conv_out.weight.detach(), folder_vae.decoder.conv_out.weight.detach())
    cache.use_add_ons(tiny_entry)
