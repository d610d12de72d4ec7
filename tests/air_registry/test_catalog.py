from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imagewire.air_registry.catalog import SHIPPED_CATALOG, Catalog, ModelDefaults
from imagewire.air_registry.errors import CatalogError, MalformedAIR, UnknownModel
from imagewire.tasks.image_inference import check_model_defaults
from imagewire.tasks.inputs import task_error

# The imageInference models: checkpoints, the add-ons (LoRAs, embeddings, VAEs) and the ControlNets and safety
# checkers beside them.
INFERENCE_AIRS = [
    "imagewire:tiny@1",
    "imagewire:sd15@1",
    "imagewire:sd21@1",
    "imagewire:sdxl-base@1",
    "imagewire:sdxl-refiner@1",
    "imagewire:tiny-lora@1",
    "imagewire:tiny-embedding@1",
    "imagewire:tiny-vae@1",
    "imagewire:tiny-sdxl@1",
    "imagewire:tiny-sdxl-refiner@1",
    "imagewire:tiny-flux@1",
    "imagewire:tiny-flux-kontext@1",
    "imagewire:tiny-sd3@1",
    "runware:100@1",
    "runware:101@1",
    "runware:107@1",
    "runware:5@1",
    "imagewire:sd35-medium@1",
    "imagewire:sd35-large@1",
    "imagewire:sd35-large-turbo@1",
    "civitai:101055@128078",
    "imagewire:sd-turbo@1",
    "imagewire:sdxl-turbo@1",
    "runware:106@1",
    "runware:102@1",
    "imagewire:tiny-inpaint@1",
    "imagewire:tiny-controlnet@1",
    "imagewire:tiny-safety@1",
    "imagewire:sd15-inpaint@1",
    "imagewire:sdxl-inpaint@1",
    "imagewire:sd15-controlnet-canny@1",
    "imagewire:sdxl-controlnet-canny@1",
    "imagewire:sd-safety-checker@1",
    # IP-Adapters: the tiny one, and the public API's ids mapped to h94/IP-Adapter's files.
    "imagewire:tiny-ip-adapter@1",
    *(f"runware:55@{version}" for version in (1, 2, 3, 4, 5, 6, 7, 8, 10)),
]
# The models of the tool task types (upscale, background removal, caption, masking, prompt enhance).
TOOL_AIRS = [
    "imagewire:tiny-upscaler@1", "imagewire:tiny-background@1", "imagewire:tiny-caption@1",
    "imagewire:tiny-masking@1", "imagewire:tiny-prompt@1", "runware:504@1", "runware:109@1", "runware:110@1",
    *(f"runware:112@{version}" for version in (1, 2, 3, 5, 6, 7, 8, 9, 10)),
    "runware:151@1", "imagewire:blip-base@1", "imagewire:owlv2-base@1", "imagewire:owlvit-base@1",
    "imagewire:magicprompt@1", "runware:llama-3-1-8b@prompt-enhancer",
]
SHIPPED_AIRS = INFERENCE_AIRS + TOOL_AIRS
SDXL_IP_ADAPTERS = [f"runware:55@{version}" for version in (1, 2, 3, 4)]
SD15_IP_ADAPTERS = [f"runware:55@{version}" for version in (5, 6, 7, 8, 10)]
ADD_ON_AIRS = ["imagewire:tiny-lora@1", "imagewire:tiny-embedding@1", "imagewire:tiny-vae@1"]
CHECKPOINT_AIRS = [air for air in INFERENCE_AIRS if "controlnet" not in air and "safety" not in air
                   and air not in ADD_ON_AIRS and "ip-adapter" not in air and not air.startswith("runware:55@")]


def write_catalog(path: Path, entries: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def folder_entry(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "air": "mysite:portrait@2",
        "name": "Portrait v2",
        "aliases": ["portrait"],
        "architecture": "sd15",
        "category": "checkpoint",
        "tags": ["portrait", "people"],
        "source": "folder",
        "location": "weights/portrait-v2",
        "defaults": {
            "width": 512,
            "height": 768,
            "steps": 25,
            "scheduler": "dpm++ 2m karras",
            "CFGScale": 6.5,
        },
    }
    entry.update(overrides)
    return entry


# ---------------------------------------------------------------- the shipped catalog


def test_the_shipped_catalog_lists_the_built_in_models(catalog: Catalog) -> None:
    assert [entry.air for entry in catalog.entries] == SHIPPED_AIRS
    assert SHIPPED_CATALOG.name == "catalog.json"


def test_the_tiny_model_is_embedded_with_its_defaults(catalog: Catalog) -> None:
    tiny = catalog.resolve("imagewire:tiny@1")
    assert tiny.source == "embedded"
    assert tiny.location == "tiny-sd"  # its builder
    assert tiny.architecture == "tiny"
    assert tiny.category == "checkpoint"
    assert tiny.version == "1"
    assert tiny.aliases == ("tiny",)
    assert tiny.defaults == ModelDefaults(
        width=256, height=256, steps=8, scheduler="Default", cfg_scale=7.0, strength=0.8
    )


@pytest.mark.parametrize(
    ("air", "repo", "size", "steps", "strength"),
    [
        ("imagewire:sd15@1", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512, 20, 0.8),
        ("imagewire:sd21@1", "stabilityai/stable-diffusion-2-1", 768, 20, 0.8),
        ("imagewire:sdxl-base@1", "stabilityai/stable-diffusion-xl-base-1.0", 1024, 30, 0.8),
        ("imagewire:sdxl-refiner@1", "stabilityai/stable-diffusion-xl-refiner-1.0", 1024, 30, 0.3),
        ("runware:100@1", "black-forest-labs/FLUX.1-schnell", 1024, 4, 0.8),
        ("runware:101@1", "black-forest-labs/FLUX.1-dev", 1024, 28, 0.8),
        ("runware:107@1", "black-forest-labs/FLUX.1-Krea-dev", 1024, 28, 0.8),
        ("runware:5@1", "stabilityai/stable-diffusion-3-medium-diffusers", 1024, 28, 0.8),
        ("imagewire:sd35-medium@1", "stabilityai/stable-diffusion-3.5-medium", 1024, 40, 0.8),
        ("imagewire:sd35-large@1", "stabilityai/stable-diffusion-3.5-large", 1024, 28, 0.8),
        ("imagewire:sd35-large-turbo@1", "stabilityai/stable-diffusion-3.5-large-turbo", 1024, 4, 0.8),
        ("civitai:101055@128078", "stabilityai/stable-diffusion-xl-base-1.0", 1024, 30, 0.8),
        ("imagewire:sd-turbo@1", "stabilityai/sd-turbo", 512, 2, 0.5),
        ("imagewire:sdxl-turbo@1", "stabilityai/sdxl-turbo", 512, 2, 0.5),
        ("runware:106@1", "black-forest-labs/FLUX.1-Kontext-dev", 1024, 28, 0.8),
        ("runware:102@1", "black-forest-labs/FLUX.1-Fill-dev", 1024, 50, 0.8),
    ],
)
def test_hub_models_name_their_repos_and_defaults(
    catalog: Catalog, air: str, repo: str, size: int, steps: int, strength: float
) -> None:
    entry = catalog.resolve(air)
    assert entry.source == "hub"
    assert entry.location == repo
    assert (entry.defaults.width, entry.defaults.height) == (size, size)
    assert entry.defaults.steps == steps
    assert entry.defaults.strength == strength


# ---------------------------------------------------------------- resolving names


@pytest.mark.parametrize(
    ("name", "air"),
    [
        ("imagewire:tiny@1", "imagewire:tiny@1"),
        ("ImageWire:tiny@1", "imagewire:tiny@1"),
        (" imagewire:sd15@1 ", "imagewire:sd15@1"),
        ("tiny", "imagewire:tiny@1"),
        ("TINY", "imagewire:tiny@1"),
        ("sd15", "imagewire:sd15@1"),
        ("stable-diffusion-v1-5", "imagewire:sd15@1"),
        ("sd21", "imagewire:sd21@1"),
        ("sdxl", "imagewire:sdxl-base@1"),
        ("sdxl-base-1.0", "imagewire:sdxl-base@1"),
        ("sdxl-refiner-1.0", "imagewire:sdxl-refiner@1"),
    ],
)
def test_models_resolve_by_air_or_alias(catalog: Catalog, name: str, air: str) -> None:
    assert catalog.resolve(name).air == air


def test_an_unknown_air_is_model_not_found(catalog: Catalog) -> None:
    with pytest.raises(UnknownModel) as caught:
        catalog.resolve("runware:999@1")
    error = task_error(caught.value, "model")
    assert error.code == "modelNotFound"
    assert error.parameter == "model"
    assert error.type == "string"
    assert "'runware:999@1'" in error.message
    assert "imagewire:tiny@1 (tiny)" in error.message
    assert error.allowed_values is not None
    assert set(SHIPPED_AIRS) <= set(error.allowed_values)
    assert "sdxl" in error.allowed_values


def test_the_id_and_version_of_an_air_are_case_sensitive(catalog: Catalog) -> None:
    with pytest.raises(UnknownModel):
        catalog.resolve("imagewire:TINY@1")


def test_a_name_that_is_neither_an_air_nor_an_alias_is_invalid(catalog: Catalog) -> None:
    with pytest.raises(MalformedAIR) as caught:
        catalog.resolve("stable diffusion")
    error = task_error(caught.value, "model")
    assert error.code == "invalidParameter"
    assert error.parameter == "model"
    assert "source:id@version" in error.message
    assert "received 'stable diffusion'" in error.message
    assert "tiny" in error.message


def test_the_not_found_message_names_at_most_ten_models(tmp_path: Path) -> None:
    # The ten named are the first ten of the catalog: the shipped models first, then these.
    entries = [folder_entry(air=f"bulk:model{i}@1", aliases=[], name=f"Model {i}") for i in range(30)]
    catalog = Catalog.load([write_catalog(tmp_path / "bulk.json", entries)])
    with pytest.raises(UnknownModel) as caught:
        catalog.resolve("bulk:missing@1")
    message = task_error(caught.value, "model").message
    assert f"and {len(catalog.entries) - 10} more" in message
    named = [entry.air for entry in catalog.entries[:10]]
    assert all(air in message for air in named) and catalog.entries[10].air not in message


# ---------------------------------------------------------------- user catalog files


def test_a_user_file_adds_models_and_resolves_relative_folders(tmp_path: Path) -> None:
    user_file = write_catalog(tmp_path / "conf" / "models.json", [folder_entry()])
    catalog = Catalog.load([user_file])
    entry = catalog.resolve("portrait")
    assert entry.air == "mysite:portrait@2"
    assert entry.version == "2"
    assert entry.location == str((tmp_path / "conf" / "weights" / "portrait-v2").resolve())
    assert entry.tags == ("portrait", "people")
    # Scheduler names are stored in their canonical spelling; missing defaults come from the architecture.
    assert entry.defaults == ModelDefaults(
        width=512, height=768, steps=25, scheduler="DPM++ 2M Karras", cfg_scale=6.5, strength=0.8
    )
    assert [e.air for e in catalog.entries] == [*SHIPPED_AIRS, "mysite:portrait@2"]


def test_a_later_entry_with_the_same_air_replaces_the_earlier_one_in_place(tmp_path: Path) -> None:
    replacement = folder_entry(
        air="ImageWire:sd15@1", name="My SD 1.5", aliases=["mine"], location="/srv/models/sd15"
    )
    catalog = Catalog.load([write_catalog(tmp_path / "override.json", [replacement])])
    assert [e.air for e in catalog.entries] == SHIPPED_AIRS
    entry = catalog.resolve("imagewire:sd15@1")
    assert entry.name == "My SD 1.5"
    assert entry.source == "folder"
    assert entry.location == "/srv/models/sd15"
    assert catalog.resolve("mine") is entry
    # The replaced entry's aliases went with it.
    with pytest.raises(MalformedAIR):
        catalog.resolve("stable-diffusion-v1-5")


def test_later_files_override_earlier_ones(tmp_path: Path) -> None:
    first = write_catalog(tmp_path / "a.json", [folder_entry(name="First")])
    second = write_catalog(tmp_path / "b.json", [folder_entry(name="Second")])
    assert Catalog.load([first, second]).resolve("portrait").name == "Second"
    assert Catalog.load([second, first]).resolve("portrait").name == "First"


def test_an_alias_claimed_by_a_later_entry_moves_to_it(tmp_path: Path) -> None:
    user_file = write_catalog(tmp_path / "c.json", [folder_entry(aliases=["sdxl"])])
    assert Catalog.load([user_file]).resolve("sdxl").air == "mysite:portrait@2"


def test_an_alias_can_map_a_runware_air_to_a_local_model(tmp_path: Path) -> None:
    user_file = write_catalog(tmp_path / "c.json", [folder_entry(aliases=["runware:999@1"])])
    assert Catalog.load([user_file]).resolve("Runware:999@1").air == "mysite:portrait@2"


def test_a_shipped_air_is_pointed_at_local_weights_by_an_entry_of_that_air(tmp_path: Path) -> None:
    local_flux = folder_entry(air="runware:101@1", name="FLUX.1 [dev], local copy", aliases=[],
                              architecture="flux1-dev", location="/srv/flux-dev",
                              defaults={"steps": 20})
    catalog = Catalog.load([write_catalog(tmp_path / "c.json", [local_flux])])
    entry = catalog.resolve("runware:101@1")
    assert (entry.source, entry.location, entry.defaults.steps, entry.defaults.cfg_scale) == (
        "folder", "/srv/flux-dev", 20, 3.5)
    # An alias cannot claim it: the AIR itself would always be found first.
    aliasing = folder_entry(aliases=["runware:101@1"])
    with pytest.raises(CatalogError, match="alias 'runware:101@1' is the AIR id of another model"):
        Catalog.load([write_catalog(tmp_path / "d.json", [aliasing])])


def test_single_file_locations_resolve_against_the_catalog_file(tmp_path: Path) -> None:
    entry = folder_entry(source="single_file", location="../ckpt/model.safetensors")
    catalog = Catalog.load([write_catalog(tmp_path / "conf" / "c.json", [entry])])
    assert catalog.resolve("portrait").location == str((tmp_path / "ckpt" / "model.safetensors").resolve())


def test_an_entry_may_leave_out_the_optional_keys(tmp_path: Path) -> None:
    minimal = {
        "air": "x:y@1",
        "name": "XL",
        "architecture": "sdxl",
        "source": "hub",
        "location": "owner/repo",
    }
    entry = Catalog.load([write_catalog(tmp_path / "c.json", [minimal])]).resolve("x:y@1")
    assert entry.aliases == ()
    assert entry.tags == ()
    assert entry.category == "checkpoint"
    assert entry.defaults == ModelDefaults(
        width=1024, height=1024, steps=30, scheduler="Default", cfg_scale=7.0, strength=0.8
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"air": "x:y@1"}', "JSON list"),
        ([folder_entry(colour="red")], "unknown keys colour"),
        ([folder_entry(air="no-version")], "'air' must have the form source:id@version"),
        ([folder_entry(name=None)], "'name' is required"),
        ([folder_entry(architecture="flux")], "'architecture' must be one of"),
        ([folder_entry(source="ftp")], "'source' must be one of"),
        ([folder_entry(source="embedded", location="")], "'location' of an embedded model names its builder"),
        ([folder_entry(location="")], "needs a 'location'"),
        ([folder_entry(source="hub", location="not a repo")], "Hugging Face repo id"),
        ([folder_entry(source="single_file", location="model.bin")], "must end in .safetensors or .ckpt"),
        ([folder_entry(aliases="portrait")], "'aliases' must be a list"),
        ([folder_entry(tags=[1])], "'tags' must be a list"),
        ([folder_entry(defaults={"width": 100})], "defaults.width must be an integer from 128 to 2048, divisible"),
        ([folder_entry(defaults={"width": 500})], "2048, divisible by 64, not 500"),
        ([folder_entry(defaults={"steps": 2.5})], "defaults.steps must be an integer"),
        ([folder_entry(defaults={"CFGScale": 60})], "defaults.CFGScale must be a number from 0 to 50"),
        ([folder_entry(defaults={"strength": 0})], "defaults.strength must be a number greater than 0"),
        (
            [folder_entry(defaults={"scheduler": "Warp"})],
            "defaults.scheduler 'Warp' is not a known scheduler",
        ),
        ([folder_entry(defaults={"cfg": 7})], "unknown keys in 'defaults': cfg"),
        (
            [folder_entry(architecture="flux1-dev")],
            "defaults.scheduler DPM++ 2M Karras runs here only on diffusion models",
        ),
        (
            [folder_entry(defaults={"scheduler": "FlowMatchEulerDiscreteScheduler"})],
            "defaults.scheduler FlowMatchEulerDiscreteScheduler runs here only on flow-matching models",
        ),
        ([folder_entry(aliases=["imagewire:tiny@1"])], "is the AIR id of another model"),
    ],
)
def test_a_malformed_file_names_the_file_and_the_problem(tmp_path: Path, content: Any, problem: str) -> None:
    path = tmp_path / "broken.json"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        write_catalog(path, content)
    with pytest.raises(ValueError) as caught:
        # The server holds defaults to the wire schema's limits; the catalog checks their types itself.
        Catalog.load([path], check_defaults=check_model_defaults)
    assert isinstance(caught.value, CatalogError)
    message = str(caught.value)
    assert str(path) in message
    assert problem in message
    if isinstance(content, list):
        assert "entry 0" in message


def test_a_malformed_entry_is_named_by_its_index_and_air(tmp_path: Path) -> None:
    entries = [folder_entry(), folder_entry(air="mysite:other@1", architecture="sd4")]
    with pytest.raises(CatalogError) as caught:
        Catalog.load([write_catalog(tmp_path / "c.json", entries)])
    assert "entry 1 (mysite:other@1)" in str(caught.value)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot be read"):
        Catalog.load([tmp_path / "absent.json"])


# ---------------------------------------------------------------- search


def test_search_without_filters_returns_everything(catalog: Catalog) -> None:
    total, page = catalog.search(limit=100, offset=0)
    assert total == len(SHIPPED_AIRS)
    assert [entry.air for entry in page] == SHIPPED_AIRS


@pytest.mark.parametrize(
    ("filters", "airs"),
    [
        ({"text": "sdxl"}, ["imagewire:sdxl-base@1", "imagewire:sdxl-refiner@1", "imagewire:tiny-sdxl@1",
                            "imagewire:tiny-sdxl-refiner@1", "civitai:101055@128078", "imagewire:sdxl-turbo@1",
                            "imagewire:sdxl-inpaint@1", "imagewire:sdxl-controlnet-canny@1", *SDXL_IP_ADAPTERS]),
        ({"text": "XL Refiner"}, ["imagewire:sdxl-refiner@1", "imagewire:tiny-sdxl-refiner@1"]),
        ({"text": "stable-diffusion-v1-5"}, ["imagewire:sd15@1"]),
        ({"text": "nothing like this"}, []),
        ({"architecture": "sd15"}, ["imagewire:sd15@1", "imagewire:sd15-controlnet-canny@1",
                                    "imagewire:sd-safety-checker@1", *SD15_IP_ADAPTERS]),
        ({"architecture": "SDXL"}, ["imagewire:sdxl-base@1", "civitai:101055@128078", "imagewire:sdxl-turbo@1",
                                    "imagewire:sdxl-controlnet-canny@1", *SDXL_IP_ADAPTERS]),
        ({"category": "ip-adapter"}, ["imagewire:tiny-ip-adapter@1", *SDXL_IP_ADAPTERS, *SD15_IP_ADAPTERS]),
        ({"architecture": "flux1-dev"}, ["runware:101@1", "runware:107@1"]),
        ({"text": "flux"}, ["imagewire:tiny-flux@1", "imagewire:tiny-flux-kontext@1", "runware:100@1",
                            "runware:101@1", "runware:107@1", "runware:106@1", "runware:102@1"]),
        ({"tags": ["turbo"]}, ["imagewire:sd35-large-turbo@1", "imagewire:sd-turbo@1", "imagewire:sdxl-turbo@1"]),
        ({"category": "checkpoint"}, CHECKPOINT_AIRS),
        ({"category": "controlnet"}, ["imagewire:tiny-controlnet@1", "imagewire:sd15-controlnet-canny@1",
                                      "imagewire:sdxl-controlnet-canny@1"]),
        ({"tags": ["inpainting"]},
         ["runware:102@1", "imagewire:tiny-inpaint@1", "imagewire:sd15-inpaint@1", "imagewire:sdxl-inpaint@1"]),
        ({"category": "upscaler"}, ["imagewire:tiny-upscaler@1", "runware:504@1"]),
        ({"category": "lora"}, ["imagewire:tiny-lora@1"]),
        ({"category": "embeddings"}, ["imagewire:tiny-embedding@1"]),
        ({"category": "vae", "architecture": "tiny"}, ["imagewire:tiny-vae@1"]),
        ({"tags": ["refiner"]}, ["imagewire:sdxl-refiner@1", "imagewire:tiny-sdxl-refiner@1"]),
        ({"tags": ["SDXL", "base"]}, ["imagewire:sdxl-base@1", "civitai:101055@128078"]),
        ({"tags": ["sdxl", "sd1.5"]}, []),
        ({"text": "stable", "architecture": "sd21"}, ["imagewire:sd21@1", "imagewire:sd-turbo@1"]),
    ],
)
def test_search_filters(catalog: Catalog, filters: dict[str, Any], airs: list[str]) -> None:
    total, page = catalog.search(limit=100, offset=0, **filters)
    assert total == len(airs)
    assert [entry.air for entry in page] == airs


def test_search_pages_with_limit_and_offset(catalog: Catalog) -> None:
    count = len(SHIPPED_AIRS)
    total, page = catalog.search(limit=2, offset=0)
    assert (total, [e.air for e in page]) == (count, SHIPPED_AIRS[:2])
    total, page = catalog.search(limit=2, offset=2)
    assert (total, [e.air for e in page]) == (count, SHIPPED_AIRS[2:4])
    total, page = catalog.search(limit=2, offset=count - 1)
    assert (total, [e.air for e in page]) == (count, SHIPPED_AIRS[count - 1:])
    assert catalog.search(limit=10, offset=count + 50) == (count, [])


# ---------------------------------------------------------------- LoRAs, embeddings, VAEs


def test_the_embedded_add_ons_fit_the_tiny_model(catalog: Catalog) -> None:
    lora, embedding, vae = (catalog.resolve(name) for name in ("tiny-lora", "tiny-embedding", "tiny-vae"))
    assert (lora.category, embedding.category, vae.category) == ("lora", "embeddings", "vae")
    assert lora.architecture == embedding.architecture == vae.architecture == "tiny"
    assert embedding.token == "<tiny-embedding>" and lora.token == ""


def test_an_add_on_may_be_a_single_file_whatever_its_architecture(tmp_path: Path) -> None:
    # The tiny SDXL architecture has no single-file pipeline, but a LoRA file needs none.
    entry = folder_entry(architecture="tiny-sdxl", category="lora", source="single_file", location="l.safetensors")
    assert Catalog.load([write_catalog(tmp_path / "c.json", [entry])]).resolve("portrait").category == "lora"
    checkpoint = folder_entry(architecture="tiny-sdxl", source="single_file", location="m.safetensors")
    with pytest.raises(CatalogError, match="cannot be loaded from a single file"):
        Catalog.load([write_catalog(tmp_path / "d.json", [checkpoint])])


@pytest.mark.parametrize(("entry", "problem"), [
    (folder_entry(category="embeddings"), "an 'embeddings' model needs a 'token'"),
    (folder_entry(token="<x>"), "only an 'embeddings' model has a 'token'"),
])
def test_an_embedding_names_its_token_and_nothing_else_does(
    tmp_path: Path, entry: dict[str, Any], problem: str
) -> None:
    with pytest.raises(CatalogError, match=problem):
        Catalog.load([write_catalog(tmp_path / "c.json", [entry])])
