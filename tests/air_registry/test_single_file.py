"""Single-file checkpoints without the hub: their architecture from their tensors' names and shapes, the configs
and tokenizers diffusers reads them with from this package, and clear answers for what is missing.

Detection reads headers only: each architecture's full table of names and shapes is built from the configs the
server writes for it, on the meta device (``tests/checkpoints.py``), and written as a safetensors header with
no data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from imagewire.air_registry.catalog import Catalog, read_catalog_file
from imagewire.air_registry.checkpoints import detect_architecture, matches, tensor_shapes
from imagewire.air_registry.errors import CatalogError, WeightsMissing
from imagewire.air_registry.pipeline_configs import PIPELINE_CONFIGS
from imagewire.air_registry.single_file import (
    TokenizerMissing,
    config_folder,
    find_pieces,
    missing_components,
    missing_pieces_message,
)
from tests.checkpoints import original_layout_shapes, write_header_only

ARCHITECTURES = ["sd15", "sd15-inpaint", "sd21", "sdxl", "sdxl-inpaint", "sdxl-refiner", "flux1-dev",
                 "flux1-schnell", "flux1-fill", "sd3", "sd35-medium", "sd35-large"]


@pytest.fixture(scope="module")
def layouts() -> dict[str, dict[str, tuple[int, ...]]]:
    return {architecture: original_layout_shapes(architecture) for architecture in ARCHITECTURES}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_is_told_by_its_tensors(layouts, architecture: str) -> None:
    assert detect_architecture(layouts[architecture]) == architecture


@pytest.mark.parametrize("architecture", ["sd15", "sd15-inpaint", "sd21", "sdxl", "sdxl-inpaint", "sdxl-refiner"])
def test_each_unet_table_is_what_diffusers_converts_its_checkpoints_into(layouts, architecture: str) -> None:
    """diffusers' own conversion of the original layout gives exactly the names and shapes of the UNet our config
    builds: the table has the published shapes, and a real checkpoint's weights fit it."""
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from tests.checkpoints import _component

    unet = _component(architecture, "unet")
    original = {key: torch.empty(*shape, device="meta") for key, shape in layouts[architecture].items()
                if key.startswith("model.diffusion_model.")}
    converted = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert {key: tuple(value.shape) for key, value in converted.items()} == {
        key: tuple(value.shape) for key, value in unet.state_dict().items()}


# The published sizes of these models' components, in parameters.
PUBLISHED_SIZES = [
    ("sd15", "unet", 859_520_964), ("sd15", "vae", 83_653_863), ("sd15", "text_encoder", 123_060_480),
    ("sd21", "unet", 865_910_724), ("sdxl", "unet", 2_567_463_684), ("sdxl", "text_encoder_2", 694_659_840),
    ("flux1-dev", "transformer", 11_901_408_320), ("flux1-dev", "text_encoder_2", 4_762_310_656),
    ("sd3", "transformer", 2_028_328_000), ("sd35-large", "transformer", 8_056_627_520),
]


@pytest.mark.parametrize(("architecture", "component", "size"), PUBLISHED_SIZES)
def test_each_table_builds_the_published_model(architecture: str, component: str, size: int) -> None:
    from tests.checkpoints import _component

    model = _component(architecture, component)  # on the meta device: nothing allocated
    assert sum(parameter.numel() for parameter in model.parameters()) == size


def test_every_table_is_a_detectable_architecture() -> None:
    # Kontext has [dev]'s shapes: it is stated in a catalog entry, never detected.
    assert set(PIPELINE_CONFIGS) == {*ARCHITECTURES, "flux1-kontext"}
    assert matches("flux1-kontext", "flux1-dev") and not matches("flux1-fill", "flux1-dev")


def _catalog_file(tmp_path: Path, entry: dict) -> Path:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps([{"air": "local:mine@1", "name": "Mine", "source": "single_file", **entry}]))
    return path


def test_a_catalog_entry_of_one_file_needs_no_architecture(tmp_path: Path, layouts) -> None:
    write_header_only(tmp_path / "xl.safetensors", layouts["sdxl"])
    [(entry, _)] = read_catalog_file(_catalog_file(tmp_path, {"location": "xl.safetensors"}))
    assert entry.architecture == "sdxl"
    assert (entry.defaults.width, entry.defaults.steps) == (1024, 30)  # the detected architecture's defaults


def test_a_stated_architecture_the_file_contradicts_is_an_error_naming_both(tmp_path: Path, layouts) -> None:
    write_header_only(tmp_path / "model.safetensors", layouts["sd15"])
    with pytest.raises(CatalogError) as raised:
        Catalog.load([_catalog_file(tmp_path, {"location": "model.safetensors", "architecture": "sdxl"})])
    message = str(raised.value)
    assert "'architecture' is 'sdxl'" in message and "is a 'sd15' checkpoint by its tensors" in message
    assert str(tmp_path / "model.safetensors") in message


def test_kontext_may_be_stated_for_a_file_of_dev_shapes(tmp_path: Path, layouts) -> None:
    write_header_only(tmp_path / "kontext.safetensors", layouts["flux1-dev"], dtype="BF16")
    [(entry, _)] = read_catalog_file(_catalog_file(
        tmp_path, {"location": "kontext.safetensors", "architecture": "flux1-kontext"}))
    assert entry.architecture == "flux1-kontext"


def test_an_unreadable_file_without_an_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.safetensors").write_bytes(b"\x01")
    with pytest.raises(CatalogError, match=r"'architecture' is not given and the file .*broken\.safetensors is "
                                           r"not a safetensors file"):
        read_catalog_file(_catalog_file(tmp_path, {"location": "broken.safetensors"}))


def test_the_clip_tokenizer_is_clips_own_vocabulary(tmp_path: Path, empty_hf_cache: Path) -> None:
    from transformers import CLIPTokenizer

    folder = config_folder("sdxl", tmp_path)
    first = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    second = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    # OpenAI's ids for these words: a made-up vocabulary would give others.
    assert first("a cat").input_ids == [49406, 320, 2368, 49407]
    assert len(first) == 49408
    # OpenCLIP's towers pad with "!" (id 0), OpenAI's with the end marker.
    assert (first.pad_token_id, second.pad_token_id) == (49407, 0)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_a_missing_t5_tokenizer_is_named_with_where_it_was_looked_for(tmp_path: Path, empty_hf_cache: Path) -> None:
    with pytest.raises(TokenizerMissing) as raised:
        config_folder("flux1-dev", tmp_path / "configs", tokenizer_dirs=[tmp_path / "tokenizers"])
    message = raised.value.problem
    assert "tokenizer.json or spiece.model of google/t5-v1_1-xxl" in message
    assert f"{tmp_path / 'tokenizers' / 't5'}/tokenizer.json or spiece.model" in message
    assert "the Hugging Face cache" in message
    assert not (tmp_path / "configs" / "flux1-dev").exists()  # nothing half-written is left to be found


def test_a_t5_tokenizer_in_the_tokenizers_folder_is_used(tmp_path: Path, empty_hf_cache: Path) -> None:
    from imagewire.air_registry.tiny.tokenizers import build_t5_tokenizer

    (tmp_path / "tokenizers" / "t5").mkdir(parents=True)
    build_t5_tokenizer().backend_tokenizer.save(str(tmp_path / "tokenizers" / "t5" / "tokenizer.json"))
    folder = config_folder("flux1-schnell", tmp_path / "configs", tokenizer_dirs=[tmp_path / "tokenizers"])
    assert (folder / "tokenizer_2" / "tokenizer.json").is_file()
    assert json.loads((folder / "transformer" / "config.json").read_text())["guidance_embeds"] is False


def test_a_transformer_saved_alone_lacks_the_other_pieces(layouts) -> None:
    assert missing_components("flux1-dev", layouts["flux1-dev"]) == ["vae", "text_encoder", "text_encoder_2"]
    assert missing_components("sd15", layouts["sd15"]) == []


def test_loading_a_transformer_alone_lists_what_it_lacks(tmp_path: Path, layouts, empty_hf_cache: Path) -> None:
    from imagewire.air_registry.loader import PipelineCache

    path = write_header_only(tmp_path / "flux1-dev.safetensors", layouts["flux1-dev"], dtype="BF16")
    [(entry, _)] = read_catalog_file(_catalog_file(tmp_path, {"location": path.name}))
    with pytest.raises(WeightsMissing) as raised:
        PipelineCache(device="cpu", data_dir=tmp_path / "data").load(entry)
    assert raised.value.problem == (
        f"the file of Mine (local:mine@1) ({path}) holds only some of the model: it lacks vae (a 16-channel VAE), "
        "text_encoder (a CLIP-L text encoder), text_encoder_2 (a T5-XXL text encoder); pieces are looked for only "
        "beside a file in a models folder's diffusion_models/, unet/ or checkpoints/ (in its text_encoders/, clip/ "
        "and vae/). Put those files there, or use a checkpoint that includes them")


CLIP_L_PIECE = {"text_model.embeddings.position_embedding.weight": (77, 768),
                "text_model.final_layer_norm.weight": (768,)}
T5_PIECE = {"shared.weight": (32128, 4096), "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096)}
FLUX_VAE_PIECE = {"decoder.conv_in.weight": (512, 16, 3, 3)}


def test_a_transformer_alone_is_completed_from_its_models_folder(tmp_path: Path, layouts) -> None:
    root = tmp_path / "ComfyUI" / "models"
    path = write_header_only(root / "diffusion_models" / "flux1-dev.safetensors", layouts["flux1-dev"])
    clip = write_header_only(root / "text_encoders" / "clip_l.safetensors", CLIP_L_PIECE)
    t5 = write_header_only(root / "text_encoders" / "t5xxl_fp16.safetensors", T5_PIECE)
    vae = write_header_only(root / "vae" / "ae.safetensors", FLUX_VAE_PIECE)
    (root / "vae" / "broken.safetensors").write_bytes(b"\x00")  # passed over
    needed = missing_components("flux1-dev", layouts["flux1-dev"])
    assert find_pieces("flux1-dev", needed, path, tensor_shapes) == {
        "text_encoder": clip, "text_encoder_2": t5, "vae": vae}


def test_missing_pieces_are_named_with_where_they_were_looked_for(tmp_path: Path, layouts) -> None:
    root = tmp_path / "models"
    path = write_header_only(root / "unet" / "flux1-schnell.safetensors", layouts["flux1-schnell"])
    write_header_only(root / "clip" / "clip_l.safetensors", CLIP_L_PIECE)
    needed = missing_components("flux1-schnell", layouts["flux1-schnell"])
    found = find_pieces("flux1-schnell", needed, path, tensor_shapes)
    assert sorted(found) == ["text_encoder"]
    message = missing_pieces_message("flux1-schnell", [name for name in needed if name not in found], path)
    assert message == (
        "holds only some of the model: it lacks vae (a 16-channel VAE), text_encoder_2 (a T5-XXL text encoder); "
        f"looked for them in {root / 'text_encoders'}, {root / 'clip'}, {root / 'vae'}. Put those files there, or "
        "use a checkpoint that includes them")


def test_pieces_load_with_their_own_weights(tmp_path: Path, empty_hf_cache: Path) -> None:
    """A CLIP-L and a FLUX VAE in ComfyUI's files (the text encoder's own names, the VAE's original layout),
    full size with random weights: each loads as its pipeline component, its weights those of the file."""
    import torch
    from safetensors.torch import save_file

    from imagewire.air_registry.loader import PipelineCache
    from imagewire.air_registry.tiny.tokenizers import build_t5_tokenizer
    from tests.checkpoints import _component, _text_encoder, _vae

    generator = torch.Generator().manual_seed(0)

    def random(state: dict, prefix: str) -> dict:
        return {key.removeprefix(prefix): (torch.randn(tuple(value.shape), generator=generator) * 0.02).half()
                for key, value in state.items()}

    clip = random(_text_encoder(_component("flux1-dev", "text_encoder")), "cond_stage_model.transformer.")
    vae = random(_vae(_component("flux1-dev", "vae")), "first_stage_model.")
    save_file(clip, str(tmp_path / "clip_l.safetensors"))
    save_file(vae, str(tmp_path / "ae.safetensors"))
    (tmp_path / "data" / "tokenizers" / "t5").mkdir(parents=True)
    build_t5_tokenizer().backend_tokenizer.save(str(tmp_path / "data" / "tokenizers" / "t5" / "tokenizer.json"))
    [(entry, _)] = read_catalog_file(_catalog_file(
        tmp_path, {"location": "flux.safetensors", "architecture": "flux1-dev"}))
    cache = PipelineCache(device="cpu", data_dir=tmp_path / "data")
    folder = config_folder("flux1-dev", tmp_path / "data" / "models" / "configs",
                           tokenizer_dirs=[tmp_path / "data" / "tokenizers"])

    encoder = cache._read_piece(entry, "text_encoder", tmp_path / "clip_l.safetensors", folder)
    assert type(encoder).__name__ == "CLIPTextModel"
    norm = next(value for key, value in encoder.state_dict().items() if key.endswith("final_layer_norm.weight"))
    assert torch.equal(norm.half(), clip["text_model.final_layer_norm.weight"])
    decoder = cache._read_piece(entry, "vae", tmp_path / "ae.safetensors", folder)
    assert (decoder.config.latent_channels, decoder.config.scaling_factor) == (16, 0.3611)
    assert torch.equal(decoder.state_dict()["decoder.conv_in.weight"].half(), vae["decoder.conv_in.weight"])


@pytest.mark.parametrize("architecture", ["sd15", "sd21"])
def test_each_controlnet_config_is_what_diffusers_converts_its_checkpoints_into(architecture: str) -> None:
    import torch
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from tests.checkpoints import _controlnet, controlnet_meta

    controlnet = controlnet_meta(architecture)
    original = {key: torch.empty(*value.shape, device="meta") for key, value in _controlnet(controlnet).items()}
    converted = convert_controlnet_checkpoint(original, dict(controlnet.config))
    assert {key: tuple(value.shape) for key, value in converted.items()} == {
        key: tuple(value.shape) for key, value in controlnet.state_dict().items()}


def test_a_controlnet_file_loads_offline(tmp_path: Path, empty_hf_cache: Path) -> None:
    """A full-size SD 1.5 ControlNet in the original layout (random weights), as A1111's ControlNet/ keeps them."""
    import torch
    from safetensors.torch import save_file

    from imagewire.air_registry.loader import PipelineCache
    from tests.checkpoints import _controlnet, controlnet_meta

    meta = controlnet_meta("sd15")
    assert sum(parameter.numel() for parameter in meta.parameters()) == 361_279_120  # the published size
    generator = torch.Generator().manual_seed(0)
    state = {key: (torch.randn(tuple(value.shape), generator=generator) * 0.02).half()
             for key, value in _controlnet(meta).items()}
    save_file(state, str(tmp_path / "control_canny.safetensors"))
    entry = dataclasses.replace(
        Catalog.load().resolve("imagewire:sd15-controlnet-canny@1"), air="file:canny@1", source="single_file",
        location=str(tmp_path / "control_canny.safetensors"))
    controlnet = PipelineCache(device="cpu", data_dir=tmp_path / "data").controlnet(entry)
    assert torch.equal(controlnet.controlnet_mid_block.weight.detach().half(),
                       state["control_model.middle_block_out.0.weight"])
