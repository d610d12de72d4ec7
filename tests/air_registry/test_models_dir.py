"""--models-dir: the files of ComfyUI and AUTOMATIC1111 models folders as catalog models, with stable AIRs,
hashes computed once, broken files listed with why, and nothing read from outside the folders."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from imagewire.air_registry.catalog import Catalog
from imagewire.air_registry.errors import RegistryError
from imagewire.air_registry.models_dir import HASHES_FILE, ModelsFolders, slug
from imagewire.air_registry.weights import availability
from tests.checkpoints import original_layout_shapes, write_header_only

LORA_SD15 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768),
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (320, 4)}
LORA_SDXL = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (8, 2048)}
EMBEDDING_SD15 = {"emb_params": (2, 768)}
FLUX_VAE = {"decoder.conv_in.weight": (512, 16, 3, 3), "encoder.conv_out.weight": (32, 512, 3, 3)}


@pytest.fixture(scope="module")
def sd15_shapes() -> dict[str, tuple[int, ...]]:
    return original_layout_shapes("sd15")


def air_of(path: Path) -> str:
    return f"local:{slug(path.name.rsplit('.', 1)[0])}@{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"


def by_alias(folders: ModelsFolders) -> dict[str, object]:
    return {entry.aliases[0]: entry for entry in folders.entries}


def test_a_comfyui_folder_becomes_catalog_models(tmp_path: Path, sd15_shapes) -> None:
    root = tmp_path / "ComfyUI" / "models"
    checkpoint = write_header_only(root / "checkpoints" / "My Model v2.safetensors", sd15_shapes)
    flux = write_header_only(root / "diffusion_models" / "flux1-dev.safetensors",
                             original_layout_shapes("flux1-dev"), dtype="BF16")
    write_header_only(root / "loras" / "style.safetensors", LORA_SD15)
    write_header_only(root / "loras" / "xl" / "detail.safetensors", LORA_SDXL)  # subfolders are read too
    write_header_only(root / "embeddings" / "negative.safetensors", EMBEDDING_SD15)
    write_header_only(root / "vae" / "ae.safetensors", FLUX_VAE)
    (root / "upscale_models").mkdir()
    (root / "upscale_models" / "4x-UltraSharp.pth").write_bytes(b"weights")
    (root / "notes").mkdir()
    (root / "notes" / "other.safetensors").write_bytes(b"not a models subfolder")

    folders = ModelsFolders([root], tmp_path / "data")
    added, removed = folders.rescan()
    found = {entry.aliases[0]: entry for entry in added}
    assert removed == []
    assert sorted(found) == ["4x-UltraSharp", "My Model v2", "ae", "detail", "flux1-dev", "negative", "style"]
    model = found["My Model v2"]
    assert (model.air, model.name, model.category, model.architecture, model.source, model.location) == (
        air_of(checkpoint), "My Model v2", "checkpoint", "sd15", "single_file", str(checkpoint))
    assert model.air.startswith("local:my-model-v2@")
    assert (found["flux1-dev"].air, found["flux1-dev"].architecture) == (air_of(flux), "flux1-dev")
    assert [(found[name].category, found[name].architecture) for name in ("style", "detail", "negative", "ae")] == [
        ("lora", "sd15"), ("lora", "sdxl"), ("embeddings", "sd15"), ("vae", "flux1-dev")]
    assert found["negative"].token == "negative"
    assert (found["4x-UltraSharp"].category, found["4x-UltraSharp"].architecture) == ("upscaler", "esrgan")
    # Each is a model the catalog resolves by AIR and by file name.
    catalog = Catalog([])
    for entry in added:
        catalog.add(entry)
    assert catalog.resolve("my model v2") is model and catalog.resolve(model.air) is model


def test_an_automatic1111_folder_is_read_the_same_way(tmp_path: Path, sd15_shapes) -> None:
    root = tmp_path / "stable-diffusion-webui" / "models"
    write_header_only(root / "Stable-diffusion" / "dreamy.safetensors", sd15_shapes)
    write_header_only(root / "Lora" / "ink.safetensors", LORA_SD15)
    write_header_only(root / "VAE" / "flux-vae.safetensors", FLUX_VAE)
    (root / "ESRGAN").mkdir()
    (root / "ESRGAN" / "x4.pth").write_bytes(b"weights")
    found = by_alias(_scanned(root, tmp_path))
    assert {name: (entry.category, entry.architecture) for name, entry in found.items()} == {
        "dreamy": ("checkpoint", "sd15"), "ink": ("lora", "sd15"), "flux-vae": ("vae", "flux1-dev"),
        "x4": ("upscaler", "esrgan")}


def _scanned(root: Path, tmp_path: Path) -> ModelsFolders:
    folders = ModelsFolders([root], tmp_path / "data")
    folders.rescan()
    return folders


def test_a_broken_file_is_listed_unavailable_with_why_and_the_rest_still_load(tmp_path: Path, sd15_shapes) -> None:
    root = tmp_path / "models"
    write_header_only(root / "checkpoints" / "good.safetensors", sd15_shapes)
    broken = root / "checkpoints" / "half-downloaded.safetensors"
    broken.write_bytes(b"\x10\x00")
    write_header_only(root / "loras" / "odd.safetensors", {"some.weight": (3, 3)})
    found = by_alias(_scanned(root, tmp_path))
    assert found["good"].problem == ""
    entry = found["half-downloaded"]
    assert entry.architecture == "unknown" and entry.air == air_of(broken)
    assert entry.problem == (f"the file {broken} is not a safetensors file: it is shorter than its header's length")
    assert availability(entry, data_dir=tmp_path) == (False, entry.problem)
    assert found["odd"].problem.endswith("is a LoRA of no architecture this server tells apart (SD 1.x, 2.x, XL, "
                                         "FLUX.1)")


def test_each_file_is_hashed_once_and_kept_by_path_size_and_time(tmp_path: Path, sd15_shapes) -> None:
    root = tmp_path / "models"
    checkpoint = write_header_only(root / "checkpoints" / "model.safetensors", sd15_shapes)
    first = by_alias(_scanned(root, tmp_path))["model"]
    hashes_file = tmp_path / "data" / HASHES_FILE
    kept = json.loads(hashes_file.read_text())
    assert kept[str(checkpoint)]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    # A later start reads the kept hash rather than the file: a changed record shows it was used.
    kept[str(checkpoint)]["sha256"] = "0123456789abcdef" * 4
    hashes_file.write_text(json.dumps(kept))
    assert by_alias(_scanned(root, tmp_path))["model"].air == "local:model@01234567"
    # A file that changed (its time) is hashed again.
    os.utime(checkpoint, ns=(1, 1))
    assert by_alias(_scanned(root, tmp_path))["model"].air == first.air


def test_links_out_of_the_folder_are_refused(tmp_path: Path, sd15_shapes) -> None:
    outside = write_header_only(tmp_path / "elsewhere" / "secret.safetensors", sd15_shapes)
    root = tmp_path / "models"
    inside = write_header_only(root / "checkpoints" / "real.safetensors", sd15_shapes)
    (root / "checkpoints" / "escape.safetensors").symlink_to(outside)
    (root / "checkpoints" / "alias.safetensors").symlink_to(inside)  # a link within the folder is fine
    (root / "loras").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    found = by_alias(_scanned(root, tmp_path))
    assert sorted(found) == ["alias", "escape", "real"]  # the linked loras folder is not followed
    assert found["escape"].problem == (f"the file {root / 'checkpoints' / 'escape.safetensors'} is a link to a file "
                                       "outside its models folder, which is never read")
    assert found["escape"].air == "local:escape@unusable"  # not even hashed
    assert found["alias"].problem == "" and found["real"].problem == ""


def test_names_in_requests_never_reach_the_file_system(tmp_path: Path, sd15_shapes) -> None:
    root = tmp_path / "models"
    checkpoint = write_header_only(root / "checkpoints" / "real.safetensors", sd15_shapes)
    catalog = Catalog(_scanned(root, tmp_path).entries)
    for name in ("../models/checkpoints/real", str(checkpoint), "checkpoints/real.safetensors",
                 "real.safetensors", "local:../real@1"):
        with pytest.raises(RegistryError):
            catalog.resolve(name)


def test_a_rescan_finds_new_changed_and_removed_files(tmp_path: Path, sd15_shapes) -> None:
    root = tmp_path / "models"
    first = write_header_only(root / "checkpoints" / "first.safetensors", sd15_shapes)
    folders = ModelsFolders([root], tmp_path / "data")
    [entry], _ = folders.rescan()
    assert folders.rescan() == ([], [])  # nothing changed: nothing read again
    second = write_header_only(root / "loras" / "second.safetensors", LORA_SD15)
    first.unlink()
    added, removed = folders.rescan()
    assert [new.air for new in added] == [air_of(second)] and removed == [entry.air]


def test_a_removed_file_gives_its_alias_back_to_the_entry_that_had_it(tmp_path: Path, sd15_shapes) -> None:
    catalog = Catalog.load()
    shipped = catalog.resolve("sd15")
    root = tmp_path / "models"
    write_header_only(root / "checkpoints" / "sd15.safetensors", sd15_shapes)
    folders = ModelsFolders([root], tmp_path / "data")
    [entry], _ = folders.rescan()
    catalog.add(entry)
    assert catalog.resolve("sd15") is entry  # the file's name claims the alias while it is there
    (root / "checkpoints" / "sd15.safetensors").unlink()
    _, removed = folders.rescan()
    for air in removed:
        catalog.remove(air)
    assert catalog.resolve("sd15") is shipped and catalog.get(entry.air) is None
    assert entry not in catalog.entries


def test_a_missing_models_folder_is_said_and_looked_at_again(tmp_path: Path, sd15_shapes,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "not-mounted-yet"
    folders = ModelsFolders([root], tmp_path / "data")
    assert folders.rescan() == ([], [])
    assert f"models folder {root} cannot be read as a models folder (No such file or directory)" in caplog.text
    write_header_only(root / "checkpoints" / "model.safetensors", sd15_shapes)
    [entry], _ = folders.rescan()
    assert entry.architecture == "sd15"


@pytest.mark.parametrize(("keys", "expected"), [
    # kohya (sd-scripts) FLUX names, XLabs' names, diffusers' names with the single-stream blocks
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (16, 3072)}, "flux1-dev"),
    ({"double_blocks.0.processor.qkv_lora1.down.weight": (16, 3072)}, "flux1-dev"),
    ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (16, 3072)}, "flux1-dev"),
    # diffusers' names on the double-stream blocks alone: FLUX's width
    ({"transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": (16, 3072)}, "flux1-dev"),
    # kohya SD 1.x and SDXL names: the width cross-attention reads
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768)}, "sd15"),
    ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 2048)}, "sdxl"),
])
def test_a_loras_architecture_is_told_from_its_names_and_widths(keys, expected):
    from imagewire.air_registry.models_dir import add_on_architecture

    assert add_on_architecture("lora", keys) == expected


def test_a_lora_of_sd3_width_is_not_taken_for_flux():
    from imagewire.air_registry.models_dir import add_on_architecture

    with pytest.raises(RegistryError, match="LoRA of no architecture"):
        add_on_architecture("lora", {"transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": (16, 1536)})


def test_a_lycoris_format_diffusers_cannot_load_is_told_by_name():
    from imagewire.air_registry.models_dir import UnloadableLoraFormat, add_on_architecture

    with pytest.raises(UnloadableLoraFormat, match="LyCORIS LoHa"):
        add_on_architecture("lora", {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": (4, 4)})
    # FLUX trainers' bias differences are not LyCORIS full differences: diffusers drops them.
    assert add_on_architecture("lora", {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (16, 3072),
                                        "lora_unet_double_blocks_0_img_attn_qkv.diff_b": (9216,)}) == "flux1-dev"


@pytest.mark.parametrize(("keys", "expected"), [
    ({"emb_params": (2, 768)}, "sd15"),                   # AUTOMATIC1111's
    ({"emb_params": (4, 1024)}, "sd21"),
    ({"<my-token>": (2, 768)}, "sd15"),                   # diffusers' own {token: vectors}
    ({"clip_l": (3, 768), "clip_g": (3, 1280)}, "sdxl"),  # SDXL's, one per text encoder
])
def test_an_embeddings_architecture_is_told_from_its_vectors(keys, expected):
    from imagewire.air_registry.models_dir import add_on_architecture

    assert add_on_architecture("embeddings", keys) == expected


@pytest.mark.parametrize(("category", "keys", "error", "words"), [
    ("embeddings", LORA_SD15, "NotOfCategory", "holds 2 tensors"),
    ("embeddings", {"emb_params": (2, 1280)}, "RegistryError", "vectors of 768 (SD 1.x) or 1024"),
    ("embeddings", {"clip_l": (3, 768), "clip_g": (2, 1280)}, "RegistryError", "as many vectors"),
    # A checkpoint's UNet has cross-attention of a width, and no guide-image encoder.
    ("controlnet", {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)},
     "NotOfCategory", "is not a ControlNet"),
    ("controlnet", {"control_model.input_hint_block.0.weight": (16, 3, 3, 3), "control_model.zero_convs.0.0.weight":
                    (320, 320, 1, 1), "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                    (320, 1280)}, "RegistryError", "ControlNet of no architecture"),
    ("controlnet", {"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3), "controlnet_down_blocks.0.weight":
                    (320, 320, 1, 1), "conv_in.weight": (320, 9, 3, 3)}, "RegistryError", "reads 9-channel latents"),
])
def test_a_file_that_is_no_embedding_or_controlnet_here_is_told_why(category, keys, error, words):
    from imagewire.air_registry import models_dir

    with pytest.raises(getattr(models_dir, error)) as caught:
        models_dir.add_on_architecture(category, keys)
    assert words in caught.value.problem
    assert (error == "NotOfCategory") == isinstance(caught.value, models_dir.NotOfCategory)
