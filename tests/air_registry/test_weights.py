"""Where each kind of catalog entry keeps its weights, and what a client hears when they are missing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from imagewire.air_registry.catalog import Catalog, ModelEntry
from imagewire.air_registry.errors import WeightsMissing
from imagewire.air_registry.weights import availability, locate_weights
from imagewire.tasks.inputs import task_error

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def fake_hub_snapshot(cache: Path, repo: str, *, with_model_index: bool = True) -> Path:
    """A repo in the layout of the Hugging Face cache: refs/main names a snapshot folder."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo_dir / "snapshots" / commit
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "config.json").write_text("{}", encoding="utf-8")
    if with_model_index:
        (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "X"}), encoding="utf-8")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit, encoding="utf-8")
    return snapshot


def with_source(entry: ModelEntry, source: str, location: str) -> ModelEntry:
    return dataclasses.replace(entry, source=source, location=location)


# ---------------------------------------------------------------- hub


def test_a_hub_model_missing_from_the_cache_is_unavailable_with_a_reason(
    catalog: Catalog, empty_hf_cache: Path, tmp_path: Path
) -> None:
    available, reason = availability(catalog.resolve("sd15"), data_dir=tmp_path)
    assert available is False
    assert SD15_REPO in reason
    assert "not in the local cache" in reason


def test_locating_a_missing_hub_model_says_what_is_missing_and_how_to_get_it(
    catalog: Catalog, empty_hf_cache: Path, tmp_path: Path
) -> None:
    with pytest.raises(WeightsMissing) as caught:
        locate_weights(catalog.resolve("sd15"), data_dir=tmp_path, allow_downloads=False)
    error = task_error(caught.value, "model")
    assert error.code == "modelNotFound"
    assert error.parameter == "model"
    assert error.message.startswith(
        "the weights of Stable Diffusion 1.5 (imagewire:sd15@1) are not on this server: "
        f"Hugging Face repo '{SD15_REPO}' is not in the local cache"
    )
    assert f"hf download {SD15_REPO}" in error.message
    assert "--allow-downloads" in error.message
    # The server's own paths stay out of what a client reads.
    assert str(empty_hf_cache) not in error.message
    assert str(tmp_path) not in error.message


def test_a_failed_download_is_reported_without_details(
    catalog: Catalog, empty_hf_cache: Path, tmp_path: Path
) -> None:
    # empty_hf_cache turns the network off, so the download attempt fails at once.
    with pytest.raises(WeightsMissing) as caught:
        locate_weights(catalog.resolve("sdxl"), data_dir=tmp_path, allow_downloads=True)
    message = task_error(caught.value, "model").message
    assert "'stabilityai/stable-diffusion-xl-base-1.0' could not be downloaded" in message
    assert "Traceback" not in message
    assert caught.value.__cause__ is not None


def test_with_downloads_allowed_a_missing_hub_model_counts_as_available(
    catalog: Catalog, empty_hf_cache: Path, tmp_path: Path
) -> None:
    available, comment = availability(catalog.resolve("sd21"), data_dir=tmp_path, allow_downloads=True)
    assert available is True
    assert "on first use" in comment


def test_a_cached_hub_model_is_found_in_the_cache(
    catalog: Catalog, empty_hf_cache: Path, tmp_path: Path
) -> None:
    snapshot = fake_hub_snapshot(empty_hf_cache, SD15_REPO)
    entry = catalog.resolve("sd15")
    assert locate_weights(entry, data_dir=tmp_path, allow_downloads=False) == snapshot
    assert availability(entry, data_dir=tmp_path) == (True, "")


def test_a_cached_snapshot_without_model_index_is_incomplete(
    catalog: Catalog, empty_hf_cache: Path, tmp_path: Path
) -> None:
    fake_hub_snapshot(empty_hf_cache, SD15_REPO, with_model_index=False)
    with pytest.raises(WeightsMissing, match="has no model_index.json"):
        locate_weights(catalog.resolve("sd15"), data_dir=tmp_path, allow_downloads=False)


# ---------------------------------------------------------------- embedded, folder, single file


def test_the_embedded_model_lives_in_the_data_dir_and_is_always_available(
    tiny_entry: ModelEntry, tmp_path: Path
) -> None:
    assert locate_weights(tiny_entry, data_dir=tmp_path, allow_downloads=False) == (
        tmp_path / "models" / "imagewire-tiny-1"
    )
    # It is built on first use, so it counts as available before that.
    assert availability(tiny_entry, data_dir=tmp_path) == (True, "")


def test_a_folder_model_needs_the_folder_and_its_model_index(tiny_entry: ModelEntry, tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    entry = with_source(tiny_entry, "folder", str(folder))

    with pytest.raises(WeightsMissing, match="does not exist") as caught:
        locate_weights(entry, data_dir=tmp_path, allow_downloads=True)
    assert f"the folder '{folder}' named in the catalog" in task_error(caught.value, "model").message

    folder.mkdir()
    with pytest.raises(WeightsMissing, match="has no model_index.json"):
        locate_weights(entry, data_dir=tmp_path, allow_downloads=False)
    assert availability(entry, data_dir=tmp_path)[0] is False

    (folder / "model_index.json").write_text("{}", encoding="utf-8")
    assert locate_weights(entry, data_dir=tmp_path, allow_downloads=False) == folder
    assert availability(entry, data_dir=tmp_path) == (True, "")


def test_a_single_file_model_needs_its_file(catalog: Catalog, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    entry = with_source(catalog.resolve("sd15"), "single_file", str(checkpoint))
    available, reason = availability(entry, data_dir=tmp_path)
    assert available is False
    assert f"the file '{checkpoint}' named in the catalog does not exist" in reason
    checkpoint.write_bytes(b"\0")
    assert locate_weights(entry, data_dir=tmp_path, allow_downloads=False) == checkpoint


# ---------------------------------------------------------------- LoRAs, embeddings, VAEs


def lora_entry(catalog: Catalog, source: str, location: str) -> ModelEntry:
    return with_source(catalog.resolve("imagewire:tiny-lora@1"), source, location)


def test_a_lora_folder_answers_its_weights_file(catalog: Catalog, tmp_path: Path) -> None:
    folder = tmp_path / "my-lora"
    folder.mkdir()
    entry = lora_entry(catalog, "folder", str(folder))
    with pytest.raises(WeightsMissing, match="holds no pytorch_lora_weights.safetensors"):
        locate_weights(entry, data_dir=tmp_path, allow_downloads=False)
    # A folder with one weights file under any name (as downloaded from a model site) is that file...
    (folder / "detail-tweaker.safetensors").write_bytes(b"\0")
    assert locate_weights(entry, data_dir=tmp_path, allow_downloads=False) == folder / "detail-tweaker.safetensors"
    # ...two are ambiguous, unless one has the name diffusers gives it.
    (folder / "other.safetensors").write_bytes(b"\0")
    with pytest.raises(WeightsMissing, match="not exactly one .safetensors file"):
        locate_weights(entry, data_dir=tmp_path, allow_downloads=False)
    named = folder / "pytorch_lora_weights.safetensors"
    named.write_bytes(b"\0")
    assert locate_weights(entry, data_dir=tmp_path, allow_downloads=False) == named


def test_a_single_file_lora_is_its_file(catalog: Catalog, tmp_path: Path) -> None:
    entry = lora_entry(catalog, "single_file", str(tmp_path / "style.safetensors"))
    assert availability(entry, data_dir=tmp_path)[0] is False
    (tmp_path / "style.safetensors").write_bytes(b"\0")
    assert locate_weights(entry, data_dir=tmp_path, allow_downloads=False) == tmp_path / "style.safetensors"


def test_a_cached_hub_lora_is_the_weights_file_in_its_snapshot(
    catalog: Catalog, empty_hf_cache: Path, tmp_path: Path
) -> None:
    entry = lora_entry(catalog, "hub", "someone/pixel-art-lora")
    with pytest.raises(WeightsMissing) as caught:
        locate_weights(entry, data_dir=tmp_path, allow_downloads=False)
    # The download command fetches the weights file, not a pipeline's folders.
    assert "hf download someone/pixel-art-lora --include '*.safetensors'" in caught.value.problem
    snapshot = fake_hub_snapshot(empty_hf_cache, "someone/pixel-art-lora", with_model_index=False)
    with pytest.raises(WeightsMissing, match="no single .safetensors weights file"):
        locate_weights(entry, data_dir=tmp_path, allow_downloads=False)
    (snapshot / "pytorch_lora_weights.safetensors").write_bytes(b"\0")
    found = locate_weights(entry, data_dir=tmp_path, allow_downloads=False)
    assert found == snapshot / "pytorch_lora_weights.safetensors"


def test_a_vae_folder_needs_its_config(catalog: Catalog, tmp_path: Path) -> None:
    folder = tmp_path / "vae"
    folder.mkdir()
    entry = with_source(catalog.resolve("imagewire:tiny-vae@1"), "folder", str(folder))
    with pytest.raises(WeightsMissing, match="has no config.json"):
        locate_weights(entry, data_dir=tmp_path, allow_downloads=False)
    (folder / "config.json").write_text("{}", encoding="utf-8")
    assert locate_weights(entry, data_dir=tmp_path, allow_downloads=False) == folder


def test_a_hub_ip_adapter_needs_its_file_and_its_image_encoder(
    catalog: Catalog, empty_hf_cache: Path, tmp_path: Path
) -> None:
    plain, vit_g = catalog.resolve("runware:55@5"), catalog.resolve("runware:55@10")
    available, reason = availability(vit_g, data_dir=tmp_path)
    assert not available
    # The ViT-G adapter of SD 1.5 reads with the SDXL folder's encoder, as h94/IP-Adapter lays them out.
    assert ("`hf download h94/IP-Adapter models/ip-adapter_sd15_vit-G.safetensors "
            "sdxl_models/image_encoder/config.json sdxl_models/image_encoder/model.safetensors`") in reason
    snapshot = fake_hub_snapshot(empty_hf_cache, "h94/IP-Adapter")
    (snapshot / "models").mkdir()
    (snapshot / "models" / "ip-adapter_sd15.safetensors").write_bytes(b"x")
    assert not availability(plain, data_dir=tmp_path)[0]  # the file alone is not enough
    (snapshot / "models" / "image_encoder").mkdir()
    for name in ("config.json", "model.safetensors"):
        (snapshot / "models" / "image_encoder" / name).write_text("{}", encoding="utf-8")
    assert locate_weights(plain, data_dir=tmp_path, allow_downloads=False) == (
        snapshot / "models" / "ip-adapter_sd15.safetensors")
