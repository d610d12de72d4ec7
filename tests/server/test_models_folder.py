"""--models-dir through a real server: a ComfyUI folder's checkpoint runs by its file name, a broken file is
listed as unavailable with why and refused with it, and a file added while the server runs is found."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.images import generate
from tests.timing import seconds
from tests.wire import Wire, eventually, inference, model_search


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
    [model] = await model_search(server.url, "tiny-local")
    assert (model["architecture"], model["category"], model["available"]) == ("tiny", "checkpoint", True)
    assert model["air"].startswith("local:tiny-local@") and model["aliases"] == ["tiny-local"]

    [broken] = await model_search(server.url, "broken")
    assert (broken["architecture"], broken["available"]) == ("unknown", False)
    assert "broken.safetensors is not a safetensors file" in broken["comment"]
    wire = await Wire.open(server.url)
    error = await wire.error(inference(model="broken"))
    assert error["code"] == "modelNotFound" and error["parameter"] == "model"
    assert "broken.safetensors is not a safetensors file: its header would be" in error["message"]

    # Added while the server runs: found by the next look at the folder.
    (comfyui / "checkpoints" / "later.safetensors").write_bytes((comfyui / "checkpoints" /
                                                                "tiny-local.safetensors").read_bytes())
    [later] = await eventually(lambda: model_search(server.url, "later"), timeout=seconds(30))
    assert later["architecture"] == "tiny"
