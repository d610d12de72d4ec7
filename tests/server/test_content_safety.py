"""checkNSFW and safety through a real server: the embedded safety checker, one that flags everything,
and the error a server without a checker's weights gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagewire.air_registry.tiny import safety
from tests.images import pixels
from tests.server.test_controlnet import guide
from tests.server.test_editing import b64, png, seed_picture
from tests.wire import Wire, inference

FLAGGING = "test:flags-everything@1"


@pytest.fixture(scope="session")
def flagging_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog file naming the tiny checker built to flag every image (see air_registry/tiny/safety.py)."""
    root = tmp_path_factory.mktemp("flagging-checker")
    safety.build(root / "checker", flag_everything=True)
    entry = {"air": FLAGGING, "name": "flags everything", "architecture": "tiny", "category": "safety",
             "source": "folder", "location": str(root / "checker")}
    (root / "catalog.json").write_text(json.dumps([entry]))
    return root / "catalog.json"


def checked(**fields):
    return inference(seed=3, outputType="base64Data", **fields)


async def test_checked_results_carry_nsfw_content_and_unchecked_ones_do_not(start_server):
    server = await start_server(safety_checker="imagewire:tiny-safety@1")
    wire = await Wire.open(server.url)
    [plain] = await wire.run(checked())
    assert "NSFWContent" not in plain
    for ask in ({"checkNSFW": True}, {"safety": {"checkContent": True}}, {"safety": {"mode": "fast"}}):
        items = await wire.run(checked(numberResults=2, **ask), count=2)
        assert [item["NSFWContent"] for item in items] == [False, False], ask
        # Unflagged results are the pictures as made (up to last-bit rounding of a batch of two).
        [same_seed] = [item for item in items if item["seed"] == 3]
        assert np.abs(pixels(same_seed) - pixels(plain)).max() <= 2
    [off] = await wire.run(checked(safety={"checkContent": True, "mode": "none"}))
    assert "NSFWContent" not in off
    await wire.close()


async def test_a_flagged_result_is_black_and_says_so(start_server, flagging_catalog):
    server = await start_server(safety_checker=FLAGGING, catalog_files=(flagging_catalog,))
    wire = await Wire.open(server.url)
    [flagged] = await wire.run(checked(checkNSFW=True))
    assert flagged["NSFWContent"] is True
    assert pixels(flagged).shape == (128, 128, 3) and pixels(flagged).max() == 0
    # Inpainting results are checked after the paste-back, as they are delivered.
    [edited] = await wire.run(checked(seedImage=b64(png(seed_picture())), maskImage=b64(png(seed_picture())),
                                      safety={"checkContent": True}))
    assert edited["NSFWContent"] is True and pixels(edited).max() == 0
    # A mask with nothing to repaint skips the device, not the check: the seed image comes back checked.
    [unchanged] = await wire.run(checked(seedImage=b64(png(seed_picture())),
                                         maskImage=b64(png(Image.new("L", (128, 128), 0))), checkNSFW=True))
    assert unchanged["NSFWContent"] is True and pixels(unchanged).max() == 0
    await wire.close()


async def test_flagged_inputs_fail_the_task_naming_them(start_server, flagging_catalog):
    server = await start_server(safety_checker=FLAGGING, catalog_files=(flagging_catalog,))
    wire = await Wire.open(server.url)
    error = await wire.error(checked(seedImage=b64(png(seed_picture())), safety={"checkInputs": True}))
    assert (error["code"], error["parameter"]) == ("invalidParameter", "seedImage")
    error = await wire.error(checked(safety={"checkInputs": True}, controlNet=[
        {"model": "imagewire:tiny-controlnet@1", "guideImage": guide("square")}]))
    assert error["parameter"] == "controlNet[0].guideImage" and "flagged" in error["message"]
    # Without input images there is nothing to check.
    [item] = await wire.run(checked(safety={"checkInputs": True}))
    assert "NSFWContent" not in item
    await wire.close()


async def test_without_the_checkers_weights_the_error_says_what_to_download(start_server, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    server = await start_server()
    wire = await Wire.open(server.url)
    error = await wire.error(checked(checkNSFW=True))
    assert error["parameter"] == "checkNSFW" and error["code"] == "modelNotFound"
    assert "hf download CompVis/stable-diffusion-safety-checker" in error["message"]
    error = await wire.error(checked(safety={"checkInputs": True}))
    assert error["parameter"] == "safety.checkInputs"
    await wire.close()


async def test_a_checker_that_is_not_a_safety_model_is_named(start_server):
    server = await start_server(safety_checker="imagewire:tiny@1")
    wire = await Wire.open(server.url)
    error = await wire.error(checked(checkNSFW=True))
    assert error["parameter"] == "checkNSFW" and "--safety-checker" in error["message"]
    await wire.close()
