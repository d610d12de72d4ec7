"""modelUpload through a real server: a checkpoint, a LoRA, a VAE, a ControlNet and an embedding served from a
loopback HTTP server, uploaded with --allow-downloads, then run by their AIR; every refusal names its parameter and
leaves nothing behind."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from imagewire.air_registry.tiny import ensure_embedded
from imagewire.air_registry.tiny.sd import build_tiny_pipeline
from tests import loras
from tests.civitai import fake_civitai
from tests.server.test_cancel import cancel_answer
from tests.wire import API_KEY, Wire, eventually, inference, new_uuid

PHASES = ["validated", "downloaded", "optimized", "stored", "ready"]


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A kohya-format LoRA of the tiny model, as Civitai serves LoRAs."""
    pipe = build_tiny_pipeline()
    path = loras.save(loras.kohya_sd(pipe.unet, (pipe.text_encoder,), seed=51),
                      tmp_path_factory.mktemp("upload-lora") / "lora.safetensors")
    return path.read_bytes()


@pytest.fixture(scope="module")
def tiny_loha(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = loras.save(loras.loha_sd(build_tiny_pipeline().unet, seed=52),
                      tmp_path_factory.mktemp("upload-loha") / "loha.safetensors")
    return path.read_bytes()


@pytest.fixture(scope="module")
def tiny_vae(models_dir: Path) -> bytes:
    """The tiny VAE as one file, as ComfyUI's vae/ folder keeps them: the original layout, no prefix."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from safetensors.torch import save

    from tests.checkpoints import _vae

    vae = AutoencoderKL.from_pretrained(ensure_embedded("tiny-vae", models_dir / "imagewire-tiny-vae-1"))
    return save({key.removeprefix("first_stage_model."): tensor.contiguous() for key, tensor in _vae(vae).items()})


@pytest.fixture(scope="module")
def tiny_controlnet(models_dir: Path) -> bytes:
    """The catalog's tiny ControlNet as one file in the original layout (``control_model.*``), as Civitai serves
    ControlNets."""
    from diffusers.models.controlnets.controlnet import ControlNetModel
    from safetensors.torch import save

    from tests.checkpoints import _controlnet

    controlnet = ControlNetModel.from_pretrained(
        ensure_embedded("tiny-controlnet", models_dir / "imagewire-tiny-controlnet-1"))
    return save({key: tensor.contiguous() for key, tensor in _controlnet(controlnet).items()})


@pytest.fixture(scope="module")
def tiny_embedding(models_dir: Path) -> bytes:
    """The catalog's tiny embedding in AUTOMATIC1111's layout: its vectors as ``emb_params``."""
    from safetensors.torch import load_file, save

    [vectors] = load_file(ensure_embedded("tiny-embedding", models_dir / "imagewire-tiny-embedding-1")
                          / "learned_embeds.safetensors").values()
    return save({"emb_params": vectors.contiguous()})


@pytest.fixture
async def files(tiny_checkpoint, tiny_lora, tiny_loha, tiny_vae, tiny_controlnet, tiny_embedding):
    async with fake_civitai() as server:
        server.files.update({"tiny.safetensors": tiny_checkpoint, "lora.safetensors": tiny_lora,
                             "loha.safetensors": tiny_loha, "vae.safetensors": tiny_vae,
                             "controlnet.safetensors": tiny_controlnet, "embedding.safetensors": tiny_embedding,
                             "cut.safetensors": tiny_checkpoint, "noise.safetensors": b"\x00" * 4096,
                             "short.safetensors": tiny_checkpoint[: len(tiny_checkpoint) // 2]})
        server.interrupted.add("cut.safetensors")
        yield server


def upload(url: str, **fields: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "taskType": "modelUpload", "taskUUID": new_uuid(), "category": "checkpoint", "type": "base",
        "architecture": "tiny", "format": "safetensors", "air": "myteam:7@1", "uniqueIdentifier": "first",
        "name": "My model", "version": "v1", "downloadURL": url,
    }
    task.update(fields)
    return {key: value for key, value in task.items() if value is not ...}


def uploads_in(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "models").glob("upload-*"))


async def failure(wire: Wire, task: dict[str, Any]) -> dict[str, Any]:
    """The error a modelUpload ends with, after the phases it passed."""
    await wire.send([task])
    data, errors = await wire.items_for(task["taskUUID"], len(PHASES) + 1)
    assert errors, f"expected an error, got {data}"
    assert [answer["status"] for answer in data] in (PHASES[:0], PHASES[:1], PHASES[:2])
    return errors[0]


async def image(wire: Wire, **fields: Any) -> str:
    [made] = await wire.run(inference(outputType="base64Data", seed=7, **fields))
    return made["imageBase64Data"]


async def test_a_checkpoint_upload_answers_each_phase_then_runs_by_its_air_and_is_kept(start_server, own_data_dir,
                                                                                        files, tiny_checkpoint):
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, allow_private_urls=True)
    wire = await Wire.open(server.url)
    task = upload(f"{files.url}/files/tiny.safetensors", defaultSteps=3, defaultCFG=5.5, tags=["mine"],
                  uniqueIdentifier=hashlib.sha256(tiny_checkpoint).hexdigest())
    answers = await wire.run(task, count=5)
    assert [answer["status"] for answer in answers] == PHASES
    assert all(answer["air"] == "myteam:7@1" and answer["taskType"] == "modelUpload" for answer in answers)
    assert answers[-1]["message"] == "Model successfully deployed and ready for use."
    # The checkpoint holds the tiny model's weights in the original layout: by its AIR, they make its image
    # (at the same settings: its own defaults, CFGScale 5.5 and 3 steps, make another).
    same = {"steps": 2, "CFGScale": 7.0}
    assert await image(wire, model="myteam:7@1", **same) == await image(wire, model="imagewire:tiny@1", **same)
    assert await image(wire, model="myteam:7@1", steps=..., CFGScale=...) != await image(
        wire, model="imagewire:tiny@1", steps=..., CFGScale=...)
    [found] = await wire.run({"taskType": "modelSearch", "search": "myteam"})
    [model] = found["results"]
    assert (model["name"], model["architecture"], model["category"], model["type"]) == (
        "My model v1", "tiny", "checkpoint", "base")
    assert (model["defaultSteps"], model["defaultCFG"], model["tags"]) == (3, 5.5, ["upload", "mine"])
    await wire.close()
    # A restarted server without downloads, and with the file's server gone, still has it.
    await files.close()
    again = await start_server(data_dir=own_data_dir)
    wire = await Wire.open(again.url)
    assert await image(wire, model="myteam:7@1", **same) == await image(wire, model="imagewire:tiny@1", **same)
    await wire.close()


async def test_a_lora_upload_is_usable_in_a_request_by_its_air(start_server, own_data_dir, files):
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, allow_private_urls=True)
    wire = await Wire.open(server.url)
    task = upload(f"{files.url}/files/lora.safetensors", category="lora", type=..., air="myteam:8@1")
    assert [answer["status"] for answer in await wire.run(task, count=5)] == PHASES
    plain = await image(wire)
    assert await image(wire, lora=[{"model": "myteam:8@1", "weight": 1.0}]) != plain
    assert await image(wire, lora=[{"model": "myteam:8@1", "weight": 0.0}]) == plain
    # The same AIR and uniqueIdentifier again: the file is kept, not downloaded again.
    fetched = files.downloads()
    assert [answer["status"] for answer in await wire.run(upload(
        f"{files.url}/files/lora.safetensors", category="lora", type=..., air="myteam:8@1", name="Renamed"),
        count=5)] == PHASES
    assert files.downloads() == fetched
    [found] = await wire.run({"taskType": "modelSearch", "search": "myteam:8"})
    assert [model["name"] for model in found["results"]] == ["Renamed v1"]
    # Another file under the AIR of a LoRA that is loaded would not be used: refused, and the file kept.
    error = await failure(wire, upload(f"{files.url}/files/lora.safetensors", category="lora", type=...,
                                       air="myteam:8@1", uniqueIdentifier="second"))
    assert (error["code"], error["parameter"]) == ("invalidParameter", "air")
    assert "new version" in error["message"] and files.downloads() == fetched
    assert await image(wire, lora=[{"model": "myteam:8@1", "weight": 0.0}]) == plain
    await wire.close()


async def test_a_cancelled_upload_stops_its_download_and_leaves_nothing(start_server, own_data_dir, files):
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, allow_private_urls=True)
    wire = await Wire.open(server.url)
    files.seconds_per_chunk["tiny.safetensors"] = 0.2  # minutes for the whole file
    task = upload(f"{files.url}/files/tiny.safetensors", deliveryMethod="async")
    await wire.send([task])
    await eventually(lambda: list((own_data_dir / "models").glob("upload-*/.upload-*.part")))
    assert (await cancel_answer(wire, task["taskUUID"]))["cancelled"] is True
    await eventually(lambda: uploads_in(own_data_dir) == [])
    refused = await wire.error(inference(model="myteam:7@1"))
    assert refused["code"] == "modelNotFound"
    await wire.close()


async def test_a_vae_upload_replaces_the_models_own_in_a_request_by_its_air(start_server, own_data_dir, files):
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, allow_private_urls=True)
    wire = await Wire.open(server.url)
    task = upload(f"{files.url}/files/vae.safetensors", category="vae", type=..., air="myteam:9@1")
    assert [answer["status"] for answer in await wire.run(task, count=5)] == PHASES
    # The same weights as the catalog's tiny VAE, read from the uploaded file: the same image.
    assert await image(wire, vae="myteam:9@1") == await image(wire, vae="imagewire:tiny-vae@1")
    assert await image(wire, vae="myteam:9@1") != await image(wire)
    await wire.close()


async def test_a_controlnet_upload_guides_a_request_by_its_air_as_the_catalogs_one_of_its_weights(
        start_server, own_data_dir, files):
    from tests.server.test_controlnet import guide, guided

    server = await start_server(data_dir=own_data_dir, allow_downloads=True, allow_private_urls=True)
    wire = await Wire.open(server.url)
    task = upload(f"{files.url}/files/controlnet.safetensors", category="controlnet", type=..., air="myteam:12@1",
                  conditioning="canny", downloadURL=..., downloadUrl=f"{files.url}/files/controlnet.safetensors")
    assert [answer["status"] for answer in await wire.run(task, count=5)] == PHASES
    # The same weights as the catalog's tiny ControlNet, read from the original layout: the same image.
    [uploaded] = await wire.run(guided([{"model": "myteam:12@1", "guideImage": guide("square")}]))
    [built_in] = await wire.run(guided([{"model": "imagewire:tiny-controlnet@1", "guideImage": guide("square")}]))
    [plain] = await wire.run(guided(None))
    assert uploaded["imageBase64Data"] == built_in["imageBase64Data"] != plain["imageBase64Data"]
    [found] = await wire.run({"taskType": "modelSearch", "conditioning": "canny", "category": "controlnet",
                              "search": "myteam"})
    [model] = found["results"]
    assert (model["air"], model["architecture"], model["conditioning"]) == ("myteam:12@1", "tiny", "canny")
    await wire.close()


async def test_an_embedding_upload_stands_for_its_token_as_the_catalogs_one_of_its_vectors(start_server,
                                                                                            own_data_dir, files):
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, allow_private_urls=True)
    wire = await Wire.open(server.url)
    task = upload(f"{files.url}/files/embedding.safetensors", category="embeddings", type="negative",
                  air="myteam:13@1", positiveTriggerWords=["mytoken"])
    assert [answer["status"] for answer in await wire.run(task, count=5)] == PHASES
    # Its token, another word for the same vectors as the catalog's tiny embedding's: the same image.
    uploaded = await image(wire, positivePrompt="a photo of mytoken", embeddings=[{"model": "myteam:13@1"}])
    built_in = await image(wire, positivePrompt="a photo of <tiny-embedding>",
                           embeddings=[{"model": "imagewire:tiny-embedding@1"}])
    assert uploaded == built_in != await image(wire, positivePrompt="a photo of mytoken")
    [found] = await wire.run({"taskType": "modelSearch", "search": "myteam:13"})
    [model] = found["results"]
    assert (model["category"], model["architecture"], model["positiveTriggerWords"]) == (
        "embeddings", "tiny", "mytoken")
    assert "negative-embedding" in model["tags"]
    await wire.close()


@pytest.mark.parametrize(("words", "name", "token"), [
    (["easynegative"], "EasyNegative v2", "easynegative"),
    ("bad-hands", "Bad hands", "bad-hands"),
    # Without trigger words the name is the token, made one word, as AUTOMATIC1111 names one by its file.
    (None, "Bad Hands 5 (v2)", "bad_hands_5_v2"),
    (None, "  ---  ", "embedding"),
])
def test_an_embeddings_token_is_its_trigger_word_else_its_name(words: Any, name: str, token: str) -> None:
    import msgspec

    from imagewire.tasks import model_upload, schema

    task = msgspec.convert(upload("https://example.com/e.safetensors", category="embeddings", type="positive",
                                  name=name, **({"positiveTriggerWords": words} if words is not None else {})),
                           schema.ModelUpload)
    assert model_upload._token(task) == token


async def test_without_allow_downloads_the_upload_is_refused_naming_the_flag(start_server, own_data_dir, files):
    server = await start_server(data_dir=own_data_dir, allow_private_urls=True)
    wire = await Wire.open(server.url)
    error = await wire.error(upload(f"{files.url}/files/tiny.safetensors"))
    assert (error["code"], error["parameter"]) == ("unsupportedParameter", "downloadURL")
    assert "--allow-downloads" in error["message"]
    assert files.downloads() == 0 and uploads_in(own_data_dir) == []
    await wire.close()


@pytest.mark.parametrize(("file", "fields", "parameter", "words"), [
    # A file of another architecture than the one stated.
    ("tiny.safetensors", {"architecture": "sdxl"}, "architecture", "is a checkpoint of tiny"),
    ("tiny.safetensors", {"type": "inpainting"}, "type", "is a base checkpoint"),
    ("lora.safetensors", {"category": "lora", "type": ..., "architecture": "sd1x"}, "architecture",
     "is a LoRA of tiny"),
    # A VAE of no latents here, and one for a family whose requests take none.
    ("lora.safetensors", {"category": "vae", "type": ...}, "architecture", "is not a VAE"),
    # Not a ControlNet or an embedding at all, and an embedding of another architecture than the one stated.
    ("lora.safetensors", {"category": "controlnet", "type": ...}, "category", "is not a ControlNet"),
    ("tiny.safetensors", {"category": "controlnet", "type": ...}, "category", "is not a ControlNet"),
    ("controlnet.safetensors", {"category": "controlnet", "type": ..., "architecture": "sdxl"}, "architecture",
     "is a ControlNet of tiny"),
    ("lora.safetensors", {"category": "embeddings", "type": "positive", "positiveTriggerWords": "x"}, "category",
     "is not a textual-inversion embedding"),
    ("embedding.safetensors", {"category": "embeddings", "type": "positive", "positiveTriggerWords": "x",
                               "architecture": "sd1x"}, "architecture", "is an embedding of tiny"),
    # A LyCORIS format diffusers cannot load.
    ("loha.safetensors", {"category": "lycoris", "type": ...}, "category", "is a LyCORIS LoHa"),
    # Corrupt: not safetensors, cut short by the server, cut off mid-download.
    ("noise.safetensors", {}, "downloadURL", "is not a readable safetensors file"),
    ("short.safetensors", {}, "downloadURL", "is not a complete safetensors file"),
    ("cut.safetensors", {}, "downloadURL", "ended after"),
    ("missing.safetensors", {}, "downloadURL", "answered HTTP 404"),
    # A SHA-256 as uniqueIdentifier that is not the file's.
    ("tiny.safetensors", {"uniqueIdentifier": "0" * 64}, "uniqueIdentifier", "is not the file named"),
])
async def test_a_wrong_or_corrupt_file_is_refused_naming_the_parameter_and_nothing_is_kept(
        start_server, own_data_dir, files, file, fields, parameter, words):
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, allow_private_urls=True)
    wire = await Wire.open(server.url)
    error = await failure(wire, upload(f"{files.url}/files/{file}", **fields))
    assert (error["code"], error["parameter"]) == ("invalidParameter", parameter), error
    assert words in error["message"] and "nothing was kept" in error["message"]
    assert uploads_in(own_data_dir) == []
    refused = await wire.error(inference(model="myteam:7@1"))
    assert refused["code"] == "modelNotFound"
    await wire.close()


async def test_a_loopback_url_is_refused_without_allow_private_urls(start_server, own_data_dir, files):
    server = await start_server(data_dir=own_data_dir, allow_downloads=True)
    wire = await Wire.open(server.url)
    error = await failure(wire, upload(f"{files.url}/files/tiny.safetensors"))
    assert (error["code"], error["parameter"]) == ("invalidParameter", "downloadURL")
    assert "non-public address" in error["message"]
    assert files.downloads() == 0 and uploads_in(own_data_dir) == []
    await wire.close()


async def test_a_file_past_the_size_bound_is_refused(start_server, own_data_dir, files):
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, allow_private_urls=True,
                                max_download_bytes=1024)
    wire = await Wire.open(server.url)
    files.unannounced.add("tiny.safetensors")  # counted as it comes, not only as announced
    error = await failure(wire, upload(f"{files.url}/files/tiny.safetensors"))
    assert (error["code"], error["parameter"]) == ("invalidParameter", "downloadURL")
    assert "--max-download-gib" in error["message"]
    assert uploads_in(own_data_dir) == []
    await wire.close()


@pytest.mark.parametrize(("fields", "code", "parameter"), [
    ({"category": "embeddings", "type": "base", "positiveTriggerWords": "x"}, "invalidParameter", "type"),
    ({"category": "embeddings", "type": ..., "positiveTriggerWords": "x"}, "missingParameter", "type"),
    ({"category": "embeddings", "type": "positive", "positiveTriggerWords": ["two words"]}, "invalidParameter",
     "positiveTriggerWords[0]"),
    ({"category": "embeddings", "type": "positive", "positiveTriggerWords": ["a", "b"]}, "invalidParameter",
     "positiveTriggerWords"),
    ({"category": "embeddings", "type": "positive", "positiveTriggerWords": "x", "architecture": "flux1d"},
     "invalidParameter", "architecture"),
    ({"category": "controlnet", "type": ..., "architecture": "sd3"}, "invalidParameter", "architecture"),
    ({"category": "controlnet", "type": "base"}, "invalidParameter", "type"),
    ({"positiveTriggerWords": "x"}, "unsupportedParameter", "positiveTriggerWords"),
    ({"category": "vae", "type": ..., "architecture": "flux1d"}, "invalidParameter", "architecture"),
    ({"architecture": "sd9"}, "invalidParameter", "architecture"),
    ({"type": ...}, "missingParameter", "type"),
    ({"type": "positive"}, "invalidParameter", "type"),
    ({"category": "lora", "type": ..., "defaultSteps": 20}, "invalidParameter", "defaultSteps"),
    ({"conditioning": "canny"}, "invalidParameter", "conditioning"),
    ({"defaultScheduler": "NoSuchScheduler"}, "invalidParameter", "defaultScheduler"),
    ({"private": True}, "unsupportedParameter", "private"),
    ({"air": "imagewire:tiny@1"}, "invalidParameter", "air"),
    ({"air": "not an air"}, "invalidParameter", "air"),
    ({"downloadURL": ...}, "missingParameter", "downloadURL"),
    ({"downloadURL": "ftp://example.com/model.safetensors"}, "invalidParameter", "downloadURL"),
    ({"format": "ckpt"}, "invalidParameter", "format"),
    ({"shortDescription": "a model"}, "unsupportedParameter", "shortDescription"),
])
async def test_a_request_that_cannot_be_uploaded_is_refused_before_any_download(start_server, own_data_dir, files,
                                                                                 fields, code, parameter):
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, allow_private_urls=True)
    wire = await Wire.open(server.url)
    error = await wire.error(upload(f"{files.url}/files/tiny.safetensors", **fields))
    assert (error["code"], error["parameter"]) == (code, parameter), error
    assert files.downloads() == 0 and uploads_in(own_data_dir) == []
    await wire.close()


async def test_one_keys_uploads_take_one_download_slot_and_another_keys_upload_goes_on(start_server, own_data_dir,
                                                                                        files):
    """--max-downloads-per-key 1: a key's second upload waits for its first, and another key's runs meanwhile."""
    other_key = "b" * 32
    server = await start_server(data_dir=own_data_dir, allow_downloads=True, allow_private_urls=True,
                                api_keys=(API_KEY, other_key), max_downloads=2, max_downloads_per_key=1)
    files.seconds_per_chunk["tiny.safetensors"] = 0.2
    first = await Wire.open(server.url)
    second = await Wire.open(server.url, api_key=other_key)
    slow = [upload(f"{files.url}/files/tiny.safetensors", air=f"slow:{n}@1", deliveryMethod="async")
            for n in (1, 2)]
    await first.send(slow)

    def slow_requests() -> int:
        return sum(1 for path, _ in files.requests if path == "/files/tiny.safetensors")

    await eventually(lambda: slow_requests() == 1)
    answers = await second.run(upload(f"{files.url}/files/lora.safetensors", category="lora", type=...,
                                      air="fast:1@1"), count=5)
    assert [answer["status"] for answer in answers] == PHASES
    assert slow_requests() == 1, "the first key's second upload waits for its first"
    for task in slow:
        await cancel_answer(first, task["taskUUID"])
    await first.close()
    await second.close()


async def test_the_python_client_uploads_a_model_and_raises_the_servers_error(start_server, own_data_dir, files):
    from imagewire_client import Client, ImagewireError

    server = await start_server(data_dir=own_data_dir, allow_downloads=True, allow_private_urls=True)
    async with Client(server.url, API_KEY) as client:
        phases = await client.upload_model(
            f"{files.url}/files/lora.safetensors", air="myteam:10@1", category="lora", architecture="tiny",
            name="Client LoRA", version="v2", unique_identifier="client")
        assert phases == PHASES
        [info] = await client.models("myteam:10")
        assert (info.name, info.category, info.architecture) == ("Client LoRA v2", "lora", "tiny")
        with pytest.raises(ImagewireError) as caught:
            await client.upload_model(f"{files.url}/files/lora.safetensors", air="myteam:11@1", category="lora",
                                      architecture="sdxl", name="Wrong", version="v1", unique_identifier="x")
        assert caught.value.parameter == "architecture"
        # An embedding's token and type, a ControlNet's conditioning.
        await client.upload_model(
            f"{files.url}/files/embedding.safetensors", air="myteam:14@1", category="embeddings", type="positive",
            architecture="tiny", name="Client embedding", version="v1", unique_identifier="y", trigger_word="mine")
        await client.upload_model(
            f"{files.url}/files/controlnet.safetensors", air="myteam:15@1", category="controlnet",
            conditioning="depth", architecture="tiny", name="Client ControlNet", version="v1", unique_identifier="z")
        [embedding] = await client.models("myteam:14")
        [controlnet] = await client.models("myteam:15")
        assert (embedding.positiveTriggerWords, controlnet.conditioning) == ("mine", "depth")
