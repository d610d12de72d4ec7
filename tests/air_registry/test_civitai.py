"""Civitai checkpoints: the download against a stand-in API on loopback, and what a checkpoint's tensor
names say about its architecture."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from imagewire.air_registry import parse_air
from imagewire.air_registry.checkpoints import UnknownArchitecture, detect_architecture, tensor_shapes
from imagewire.air_registry.civitai import Civitai, DownloadFailed, NotACheckpoint
from imagewire.air_registry.errors import UnknownModel
from imagewire.tasks.inputs import task_error
from tests.civitai import FakeCivitai, fake_civitai


@pytest.fixture
async def api():
    async with fake_civitai() as civitai:
        yield civitai


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


async def fetch(civitai: Civitai, air: str):
    return await asyncio.to_thread(civitai.fetch, parse_air(air))


async def test_a_version_is_downloaded_checked_and_kept_with_its_catalog_entry(api, tiny_checkpoint, tmp_path):
    air = api.add_version(model=4201, version=130072, data=tiny_checkpoint)
    civitai = Civitai(base_url=api.url, models_dir=tmp_path / "models")
    entry = await fetch(civitai, air)
    folder = tmp_path / "models" / "civitai-4201-130072"
    assert files_under(tmp_path / "models") == ["civitai-4201-130072", "civitai-4201-130072/catalog.json",
                                                "civitai-4201-130072/model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == tiny_checkpoint
    assert (entry.air, entry.source, entry.location) == (air, "single_file", str(folder / "model.safetensors"))
    # Read from the checkpoint's own tensor names: the tiny model's SD 1.x UNet with its text width.
    assert entry.architecture == "tiny"
    assert entry.name == "Model 4201 v130072" and entry.tags == ("civitai", "SD 1.5")
    assert json.loads((folder / "catalog.json").read_text())[0]["location"] == "model.safetensors"
    # Fetched once: a second fetch, and the catalog of a restarted server, find it on disk.
    assert await fetch(civitai, air) == entry
    assert api.downloads() == 1
    assert Civitai.downloaded_catalogs(tmp_path / "models") == [folder / "catalog.json"]


async def test_the_token_goes_to_civitai_as_a_bearer_token(api, tiny_checkpoint, tmp_path):
    air = api.add_version(model=1, version=2, data=tiny_checkpoint)
    await fetch(Civitai(base_url=api.url, token="secret-token", models_dir=tmp_path), air)
    assert [authorization for _, authorization in api.requests] == ["Bearer secret-token"] * 2


async def test_two_fetches_of_one_version_download_it_once(api, tiny_checkpoint, tmp_path):
    air = api.add_version(model=1, version=2, data=tiny_checkpoint)
    civitai = Civitai(base_url=api.url, models_dir=tmp_path)
    first, second = await asyncio.gather(fetch(civitai, air), fetch(civitai, air))
    assert first == second and api.downloads() == 1


async def failure(api: FakeCivitai, tmp_path: Path, air: str, error: type[Exception]) -> str:
    """The client's message for a fetch that fails, after checking that it left nothing on disk."""
    with pytest.raises(error) as caught:
        await fetch(Civitai(base_url=api.url, models_dir=tmp_path / "models"), air)
    assert files_under(tmp_path / "models") == []
    return task_error(caught.value, "model").message


async def test_an_interrupted_download_leaves_nothing_and_says_so(api, tiny_checkpoint, tmp_path):
    air = api.add_version(model=1, version=2, data=tiny_checkpoint)
    api.interrupted.add("model.safetensors")
    message = await failure(api, tmp_path, air, DownloadFailed)
    assert message.startswith("the weights of civitai:1@2 could not be downloaded: the download from ")
    assert "broke off" in message or "ended after" in message
    assert message.endswith("nothing was kept (send the task again to retry)")
    # Once the file comes whole, the same fetch succeeds.
    api.interrupted.clear()
    assert (await fetch(Civitai(base_url=api.url, models_dir=tmp_path / "models"), air)).architecture == "tiny"


async def test_a_wrong_checksum_leaves_nothing_and_names_both_hashes(api, tiny_checkpoint, tmp_path):
    air = api.add_version(model=1, version=2, data=tiny_checkpoint, sha256="ab" * 32)
    message = await failure(api, tmp_path, air, DownloadFailed)
    assert f"not {'ab' * 32} as Civitai lists" in message and "has SHA-256 " in message


async def test_a_missing_version_is_model_not_found(api, tmp_path):
    message = await failure(api, tmp_path, "civitai:1@404", UnknownModel)
    assert message == f"model 'civitai:1@404' is not on Civitai: {api.url}/api/v1/model-versions/404 answered 404"


async def test_a_missing_file_leaves_nothing(api, tiny_checkpoint, tmp_path):
    air = api.add_version(model=1, version=2, data=tiny_checkpoint)
    del api.files["model.safetensors"]
    message = await failure(api, tmp_path, air, DownloadFailed)
    assert "answered 404: the file is not there" in message
    assert task_error(DownloadFailed(message), "model").code == "modelNotFound"


async def test_a_version_of_another_model_is_not_found(api, tiny_checkpoint, tmp_path):
    api.add_version(model=1, version=2, data=tiny_checkpoint)
    message = await failure(api, tmp_path, "civitai:7@2", UnknownModel)
    assert "Civitai's version 2 belongs to model 1, not 7" in message


@pytest.mark.parametrize(("change", "problem"), [
    ({"kind": "LORA"}, "is a LORA on Civitai, not a checkpoint"),
    ({"file_name": "model.ckpt"}, "has no safetensors file on Civitai"),
])
async def test_what_is_not_a_safetensors_checkpoint_is_not_downloaded(api, tiny_checkpoint, tmp_path, change, problem):
    air = api.add_version(model=1, version=2, data=tiny_checkpoint, **change)
    message = await failure(api, tmp_path, air, NotACheckpoint)
    assert problem in message
    assert api.downloads() == 0


async def test_a_checkpoint_of_no_known_architecture_is_not_kept(api, tmp_path):
    import numpy as np
    from safetensors.numpy import save

    air = api.add_version(model=1, version=2, data=save({"some.weight": np.zeros((2, 2), np.float32)}))
    message = await failure(api, tmp_path, air, NotACheckpoint)
    assert message.startswith("model 'civitai:1@2' was downloaded but its file 'model.safetensors' has tensors "
                              "of no architecture this server loads")


async def test_leftovers_of_a_killed_download_are_cleared(api, tiny_checkpoint, tmp_path):
    air = api.add_version(model=1, version=2, data=tiny_checkpoint)
    folder = tmp_path / "civitai-1-2"
    folder.mkdir()
    (folder / ".download-x.part").write_bytes(b"half")
    await fetch(Civitai(base_url=api.url, models_dir=tmp_path), air)
    assert files_under(folder) == ["catalog.json", "model.safetensors"]


# ---------------------------------------------------------------- architectures from tensor names


def test_the_tiny_checkpoints_header_is_read_without_loading_it(tiny_checkpoint, tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(tiny_checkpoint)
    shapes = tensor_shapes(path)
    assert shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"][1] == 32
    assert detect_architecture(shapes) == "tiny"


SD_UNET = {"model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3]}


def cross_attention(width: int) -> dict[str, list[int]]:
    return {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, width]}


@pytest.mark.parametrize(("shapes", "architecture"), [
    ({**SD_UNET, **cross_attention(768)}, "sd15"),
    ({**SD_UNET, **cross_attention(1024)}, "sd21"),
    ({**SD_UNET, "conditioner.embedders.1.model.ln_final.weight": [1280]}, "sdxl"),
    ({**SD_UNET, "conditioner.embedders.0.model.ln_final.weight": [1280]}, "sdxl-refiner"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": [128]}, "flux1-schnell"),
    ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": [128],
      "model.diffusion_model.guidance_in.in_layer.weight": [3072, 256],
      "model.diffusion_model.img_in.weight": [3072, 64]}, "flux1-dev"),
    ({f"joint_blocks.{i}.context_block.attn.qkv.weight": [4608, 1536] for i in range(24)}, "sd3"),
    ({**{f"model.diffusion_model.joint_blocks.{i}.context_block.attn.qkv.weight": [1, 1] for i in range(24)},
      "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight": [1, 1]}, "sd35-medium"),
    ({f"joint_blocks.{i}.context_block.attn.qkv.weight": [7488, 2432] for i in range(38)}, "sd35-large"),
])
def test_architectures_are_told_apart_by_their_tensors(shapes, architecture):
    assert detect_architecture(shapes) == architecture


@pytest.mark.parametrize(("shapes", "problem"), [
    ({**SD_UNET, **cross_attention(512)}, "a text width of 512"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": [128], "guidance_in.in_layer.weight": [1, 1],
      "img_in.weight": [3072, 128]}, "reading 128 input channels (Canny or Depth)"),
    ({"lora_unet_down_blocks_0.alpha": []}, "no architecture this server loads"),
])
def test_other_checkpoints_are_refused_saying_what_they_are(shapes, problem):
    with pytest.raises(UnknownArchitecture, match=re.escape(problem)):
        detect_architecture(shapes)


@pytest.mark.parametrize("content", [b"", b"\xff" * 8 + b"{}", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"])
def test_files_that_are_not_safetensors_are_unreadable(tmp_path, content):
    from imagewire.air_registry.checkpoints import UnreadableCheckpoint

    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(UnreadableCheckpoint):
        tensor_shapes(path)


async def test_a_file_past_the_size_bound_is_refused_announced_or_not(api, tiny_checkpoint, tmp_path):
    from imagewire.air_registry.civitai import DownloadLimits

    limits = DownloadLimits(max_bytes=len(tiny_checkpoint) // 2)
    announced = api.add_version(model=1, version=10, data=tiny_checkpoint, file_name="a.safetensors")
    # Civitai lists no size and the file comes without a length: it is counted as it arrives.
    unannounced = api.add_version(model=1, version=11, data=tiny_checkpoint, file_name="b.safetensors")
    del api.versions["11"]["files"][0]["sizeKB"]
    api.unannounced.add("b.safetensors")
    civitai = Civitai(base_url=api.url, models_dir=tmp_path / "models", limits=limits)
    for air, what in ((announced, "Civitai lists it at"), (unannounced, "it passed")):
        with pytest.raises(DownloadFailed, match=f"{what} .* GiB, more than the .* GiB a download may be "
                                                 r"\(--max-download-gib\)"):
            await fetch(civitai, air)
    assert files_under(tmp_path / "models") == []
    # Unbounded, the same length-less file is whole.
    assert (await fetch(Civitai(base_url=api.url, models_dir=tmp_path / "models"), unannounced)).air == unannounced


async def test_a_download_stops_before_the_disk_passes_its_free_reserve(api, tiny_checkpoint, tmp_path,
                                                                        monkeypatch):
    import collections
    import shutil

    from imagewire.air_registry import civitai as civitai_module
    from imagewire.air_registry.civitai import DownloadLimits

    air = api.add_version(model=1, version=12, data=tiny_checkpoint)
    real = shutil.disk_usage(tmp_path)
    usage = collections.namedtuple("usage", "total used free")
    # A disk with room for half the file above the reserve; what is written takes from it.
    def disk_usage(path: Path) -> usage:
        written = sum(file.stat().st_size for file in (tmp_path / "models").rglob("*") if file.is_file())
        return usage(real.total, real.used, 10 * 1024 ** 2 + len(tiny_checkpoint) // 2 - written)

    monkeypatch.setattr(civitai_module.shutil, "disk_usage", disk_usage)
    civitai = Civitai(base_url=api.url, models_dir=tmp_path / "models",
                      limits=DownloadLimits(min_free_bytes=10 * 1024 ** 2))
    with pytest.raises(DownloadFailed, match=r"less than the 0.00977 GiB free it keeps \(--min-free-disk-gib\)"):
        await fetch(civitai, air)
    assert files_under(tmp_path / "models") == []


async def test_a_download_past_its_time_bound_stops_and_leaves_nothing(api, tiny_checkpoint, tmp_path):
    from imagewire.air_registry.civitai import DownloadLimits

    air = api.add_version(model=1, version=13, data=tiny_checkpoint)
    api.seconds_per_chunk["model.safetensors"] = 0.05
    civitai = Civitai(base_url=api.url, models_dir=tmp_path / "models", limits=DownloadLimits(seconds=0.3))
    with pytest.raises(DownloadFailed, match=r"took longer than 0 s \(--download-timeout\)|took longer than"):
        await fetch(civitai, air)
    assert files_under(tmp_path / "models") == []
