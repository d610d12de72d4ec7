"""LoRAs in the formats people download (``tests/loras.py`` writes each for the tiny models), on the diffusers
engine: each one changes the image at a fixed seed, at weight 0 the image is the model's own, and formats
diffusers cannot load are refused naming the format."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from imagewire.air_registry.catalog import Catalog, ModelEntry
from imagewire.air_registry.tiny import flux, sd, sd3, sdxl
from imagewire.air_registry.weights import locate_weights
from imagewire.server.engine import DiffusersEngine
from imagewire.tasks.errors import TaskError
from imagewire.tasks.jobs import AddOn, InferenceJob
from tests import loras
from tests.engines import diffusers_engine
from tests.images import difference, image, images

CATALOG = Catalog.load()
TINY, TINY_SDXL, TINY_FLUX, TINY_SD3 = (CATALOG.resolve(name) for name in ("tiny", "tiny-sdxl", "tiny-flux",
                                                                             "tiny-sd3"))
LORA = CATALOG.resolve("tiny-lora")
SAME = 2  # batched and single calls may round differently in the last bit
CHANGED = 10


@pytest.fixture(scope="module")
def engine(module_data_dir: Path) -> DiffusersEngine:
    return diffusers_engine(module_data_dir, max_loaded_models=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora-files")


def entry(path: Path, model: ModelEntry, name: str) -> ModelEntry:
    """A catalog entry for the LoRA file at ``path``, as an operator (or a models folder) adds one."""
    return dataclasses.replace(LORA, air=f"test:{name}@1", name=name, aliases=(), source="single_file",
                               location=str(path), architecture=model.architecture)


def add_on(lora: ModelEntry, weight: float = 1.0) -> AddOn:
    return AddOn(lora, Path(lora.location), weight)


@pytest.fixture
def job(engine: DiffusersEngine) -> Callable[..., InferenceJob]:
    def make(model: ModelEntry, *loras: AddOn, prompt: str = "a red fox", seed: int = 5) -> InferenceJob:
        weights = locate_weights(model, data_dir=engine.pipelines.data_dir, allow_downloads=False)
        return InferenceJob(task_uuid=f"{prompt}-{seed}-{len(loras)}", model=model, weights=weights, prompt=prompt,
                            negative_prompt=None, width=64, height=64, steps=2, cfg_scale=3.5, sampler=None,
                            seeds=[seed], loras=tuple(loras))

    return make


def _sd_parts() -> Any:
    return sd.build_tiny_pipeline()


def _sdxl_parts() -> Any:
    return sdxl.build_tiny_sdxl_pipeline()


FORMATS: dict[str, tuple[ModelEntry, Callable[[], dict[str, Any]]]] = {
    "kohya-sd15": (TINY, lambda: loras.kohya_sd((p := _sd_parts()).unet, (p.text_encoder,), seed=21)),
    "locon-sd15": (TINY, lambda: loras.kohya_sd((p := _sd_parts()).unet, (p.text_encoder,), seed=22, locon=True)),
    "kohya-sdxl": (TINY_SDXL, lambda: loras.kohya_sd((p := _sdxl_parts()).unet, (p.text_encoder, p.text_encoder_2),
                                                      seed=23, original_layout=True)),
    "kohya-flux": (TINY_FLUX, lambda: loras.kohya_flux((p := flux.build_tiny_pipeline()).transformer, seed=24,
                                                       text_encoder=p.text_encoder)),
    "xlabs-flux": (TINY_FLUX, lambda: loras.xlabs_flux(flux.build_tiny_pipeline().transformer, seed=25)),
    "peft-flux": (TINY_FLUX, lambda: loras.peft_flux(flux.build_tiny_pipeline().transformer, seed=26)),
    "peft-sd3": (TINY_SD3, lambda: loras.peft_flux(sd3.build_tiny_pipeline().transformer, seed=27)),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_lora_in_each_format_changes_the_image_and_at_weight_zero_does_not(engine, job, folder, name):
    model, build = FORMATS[name]
    lora = entry(loras.save(build(), folder / f"{name}.safetensors"), model, name)
    plain = image(engine, job(model))
    with_lora = image(engine, job(model, add_on(lora)))
    assert difference(with_lora, plain) > CHANGED
    assert difference(image(engine, job(model, add_on(lora, 0.0))), plain) <= SAME
    assert difference(image(engine, job(model)), plain) <= SAME  # switched off again for a call without it
    adapters = engine.pipelines.text_to_image(model).get_list_adapters()
    denoiser = "unet" if model.architecture in ("tiny", "tiny-sdxl") else "transformer"
    adapter = f"lora_test_{name.replace('-', '_')}_1"
    assert adapter in adapters[denoiser]
    # The kohya files hold CLIP's layers too, under trainers' names: they load with the rest.
    if name.startswith("kohya"):
        assert adapter in adapters["text_encoder"]
    if name == "kohya-sdxl":
        assert adapter in adapters["text_encoder_2"]


def test_a_locon_adapts_the_unets_convolutions_too(engine, job, folder):
    lora = entry(loras.save(FORMATS["locon-sd15"][1](), folder / "locon.safetensors"), TINY, "locon-conv")
    image(engine, job(TINY, add_on(lora)))
    unet = engine.pipelines.text_to_image(TINY).unet
    adapted = [name for name, layer in unet.named_modules()
               if name.endswith(".resnets.0.conv1") and "lora_test_locon_conv_1" in getattr(layer, "lora_A", {})]
    assert adapted, "the LoCon's convolution updates were loaded, not dropped"


def test_two_flux_loras_at_once_and_equal_sets_batch_together(engine, job, folder):
    transformer = flux.build_tiny_pipeline().transformer
    first = entry(loras.save(loras.peft_flux(transformer, seed=31), folder / "a.safetensors"), TINY_FLUX, "flux-a")
    second = entry(loras.save(loras.kohya_flux(transformer, seed=32), folder / "b.safetensors"), TINY_FLUX,
                   "flux-b")
    alone = [image(engine, job(TINY_FLUX, add_on(lora))) for lora in (first, second)]
    both = image(engine, job(TINY_FLUX, add_on(first), add_on(second, 0.5)))
    assert min(difference(both, one) for one in alone) > CHANGED
    # The same set in another order is the same batch key, and one call gives each job its own image.
    one_job = job(TINY_FLUX, add_on(first), add_on(second, 0.5), prompt="a red fox", seed=5)
    other = job(TINY_FLUX, add_on(second, 0.5), add_on(first), prompt="a blue bird", seed=9)
    assert one_job.batch_key() == other.batch_key()
    shared = images(engine, one_job, other)
    assert difference(shared[0], both) <= SAME
    assert difference(shared[1], image(engine, other)) <= SAME
    # Another set (another weight) is another key: never one call.
    assert job(TINY_FLUX, add_on(first), add_on(second, 0.6)).batch_key() != one_job.batch_key()
    assert job(TINY_FLUX, add_on(first)).batch_key() != one_job.batch_key()


def test_a_loha_is_refused_naming_its_format(engine, job, folder):
    loha = entry(loras.save(loras.loha_sd(_sd_parts().unet, seed=41), folder / "loha.safetensors"), TINY, "loha")
    with pytest.raises(TaskError) as caught:
        image(engine, job(TINY, add_on(loha)))
    error = caught.value
    assert (error.code, error.parameter) == ("invalidParameter", "lora[0].model")
    assert "LyCORIS LoHa" in error.message and "test:loha@1" in error.message


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_a_lora_of_another_model_is_refused_not_ignored(engine, job, folder, layout):
    # An SD 1.x LoRA catalogued (wrongly) for the FLUX model: none of its names is a FLUX layer. diffusers
    # refuses kohya names it cannot convert, and skips diffusers names of no layer, which must not pass.
    if layout == "kohya":
        state = loras.kohya_sd(_sd_parts().unet, (), seed=42)
    else:
        from safetensors.torch import load_file

        from imagewire.air_registry.tiny.lora import write_lora

        # Its UNet part (the tiny models' CLIP encoders are alike, so its text encoder part would fit).
        state = {key: value for key, value in load_file(str(write_lora(folder / "peft-sd.safetensors"))).items()
                 if key.startswith("unet.")}
    wrong = entry(loras.save(state, folder / f"sd-for-flux-{layout}.safetensors"), TINY_FLUX, f"sd-for-flux-{layout}")
    plain = image(engine, job(TINY_FLUX))
    with pytest.raises(TaskError) as caught:
        image(engine, job(TINY_FLUX, add_on(wrong)))
    assert (caught.value.code, caught.value.parameter) == ("invalidParameter", "lora[0].model")
    assert f"test:sd-for-flux-{layout}@1" in caught.value.message
    if layout == "diffusers":
        assert "names no layer of this model" in caught.value.message
    assert difference(image(engine, job(TINY_FLUX)), plain) <= SAME  # the model is as it was


async def test_a_flux_lora_from_a_catalog_file_over_the_wire(start_server, folder, tmp_path):
    """FLUX takes lora on the wire: by its AIR, from an operator's catalog file, weights switched per task."""
    import json

    from tests.wire import Wire, inference

    path = loras.save(loras.kohya_flux(flux.build_tiny_pipeline().transformer, seed=61), folder / "wire.safetensors")
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps([{"air": "test:flux-style@1", "name": "FLUX style", "architecture": "tiny-flux",
                                    "category": "lora", "source": "single_file", "location": str(path)}]))
    server = await start_server(catalog_files=(catalog,))
    wire = await Wire.open(server.url)

    async def made(**fields: Any) -> str:
        [answer] = await wire.run(inference(model="imagewire:tiny-flux@1", outputType="base64Data", seed=3,
                                            width=128, height=128, **fields))
        return answer["imageBase64Data"]

    plain = await made()
    assert await made(lora=[{"model": "test:flux-style@1", "weight": 1.5}]) != plain
    assert await made(lora=[{"model": "test:flux-style@1", "weight": 0}]) == plain
    error = await wire.error(inference(model="imagewire:tiny-flux@1", lora=[{"model": "test:flux-style@1"}],
                                       clipSkip=1))
    assert (error["code"], error["parameter"]) == ("unsupportedParameter", "clipSkip")
    await wire.close()


def test_an_sd3_lora_in_a_format_diffusers_does_not_convert_is_refused_naming_its_keys(engine, job, folder):
    # sd-scripts' names for SD 3's joint blocks: diffusers reads SD 3 LoRAs in its own format only.
    transformer = sd3.build_tiny_pipeline().transformer
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    state: dict[str, Any] = {}
    loras._kohya(state, "lora_unet_joint_blocks_0_x_block_attn_qkv", *loras._pair(torch.Generator(), 3 * inner, inner),
                 2.0)
    kohya = entry(loras.save(state, folder / "sd3-kohya.safetensors"), TINY_SD3, "sd3-kohya")
    with pytest.raises(TaskError) as caught:
        image(engine, job(TINY_SD3, add_on(kohya)))
    assert (caught.value.code, caught.value.parameter) == ("invalidParameter", "lora[0].model")
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in caught.value.message
    assert "SD 3 LoRAs load in diffusers' own format only" in caught.value.message
