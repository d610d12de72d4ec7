"""--models-dir through a real server: a ComfyUI folder's checkpoint runs by its file name, a broken file is
listed as unavailable with why and refused with it, and a file added while the server runs is found."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from runware import IImageInference, Runware

from tests.timing import seconds
from tests.wire import API_KEY, Wire, eventually, inference, new_uuid


async def generate(server, model: str) -> bytes:
    client = Runware(api_key=API_KEY, url=server.url)
    await client.connect()
    try:
        [image] = await client.imageInference(requestImage=IImageInference(
            model=model, positivePrompt="a lighthouse at dawn", width=128, height=128, steps=2, seed=11,
            outputType="base64Data", outputFormat="PNG"))
        return base64.b64decode(image.imageBase64Data)
    finally:
        await client.disconnect()


async def search(server, text: str) -> list[dict]:
    """modelSearch's results as sent (the SDK's model type has no ``available`` and ``comment``)."""
    wire = await Wire.open(server.url)
    try:
        task = {"taskType": "modelSearch", "taskUUID": new_uuid(), "search": text}
        await wire.send([task])
        [result], _ = await wire.items_for(task["taskUUID"], 1)
        return result["results"]
    finally:
        await wire.close()


@pytest.fixture
def comfyui(tmp_path: Path, tiny_checkpoint: bytes) -> Path:
    root = tmp_path / "ComfyUI" / "models"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "tiny-local.safetensors").write_bytes(tiny_checkpoint)
    (root / "checkpoints" / "broken.safetensors").write_bytes(b"\xff" * 8)
    return root


async def test_a_models_folder_checkpoint_runs_by_its_file_name(start_server, comfyui: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("imagewire.server.app.MODELS_RESCAN_SECONDS", seconds(0.2))
    server = await start_server(models_dirs=(comfyui,))
    # The file holds the tiny model's weights in the original layout: they make its image.
    assert await generate(server, "tiny-local") == await generate(server, "imagewire:tiny@1")
    [model] = await search(server, "tiny-local")
    assert (model["architecture"], model["category"], model["available"]) == ("tiny", "checkpoint", True)
    assert model["air"].startswith("local:tiny-local@") and model["aliases"] == ["tiny-local"]

    [broken] = await search(server, "broken")
    assert (broken["architecture"], broken["available"]) == ("unknown", False)
    assert "broken.safetensors is not a safetensors file" in broken["comment"]
    wire = await Wire.open(server.url)
    error = await wire.error(inference(model="broken"))
    assert error["code"] == "modelNotFound" and error["parameter"] == "model"
    assert "broken.safetensors is not a safetensors file: its header would be" in error["message"]

    # Added while the server runs: found by the next look at the folder.
    (comfyui / "checkpoints" / "later.safetensors").write_bytes((comfyui / "checkpoints" /
                                                                "tiny-local.safetensors").read_bytes())
    [later] = await eventually(lambda: search(server, "later"), timeout=seconds(30))
    assert later["architecture"] == "tiny"
