"""Quantized FLUX files through a real server: float8 (e4m3fn) safetensors files, plain and ComfyUI's scaled kind, and
GGUF files (Q8_0, BF16) of the tiny FLUX's transformer, in Black Forest Labs' layout, from a models folder's
``diffusion_models/`` and from a catalog entry. Each runs, its image is close to the unquantized model's at the same
seed, and modelSearch lists it with its architecture and how its weights are stored.

The gguf package cannot write K-quants (its ``quantize`` has no Q4_K…Q6_K), so the GGUFs here are Q8_0 and BF16;
diffusers dequantizes K-quants with the same code path as Q8_0 (``GGUFParameter``, ``GGUFLinear``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from imagewire.air_registry.memory_plan import amount
from tests.images import decoded, generate, psnr
from tests.quantized_files import tiny_flux_transformer, write_float8, write_gguf, write_scaled_float8
from tests.wire import model_search

pytest.importorskip("gguf", reason="the gguf extra (imagewire[gguf]) reads GGUF files")

# The least PSNR (dB) of each file's image against the unquantized model's (measured: float8 46, scaled float8 46,
# Q8_0 57, BF16 61). A file read wrongly (a projection split at the wrong row, the final norm's halves not swapped,
# a scaled weight without its factor) makes another image altogether, far below these.
LEAST_PSNR = {"tiny-flux-fp8": 35.0, "tiny-flux-fp8-scaled": 35.0, "tiny-flux-Q8_0": 45.0, "tiny-flux-BF16": 45.0}


async def pixels(server, model: str) -> np.ndarray:
    return decoded(await generate(server, model, steps=3, seed=21))


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI models folder with the tiny FLUX transformer saved alone, four ways."""
    root = tmp_path_factory.mktemp("quantized") / "models"
    transformer = tiny_flux_transformer()
    write_float8(root / "diffusion_models" / "tiny-flux-fp8.safetensors", transformer)
    write_scaled_float8(root / "diffusion_models" / "tiny-flux-fp8-scaled.safetensors", transformer)
    write_gguf(root / "diffusion_models" / "tiny-flux-Q8_0.gguf", "Q8_0", transformer)
    write_gguf(root / "diffusion_models" / "tiny-flux-BF16.gguf", "BF16", transformer)
    return root


async def test_quantized_flux_files_run_close_to_the_unquantized_model(start_server, quantized_folder: Path) -> None:
    server = await start_server(models_dirs=(quantized_folder,))
    reference = await pixels(server, "imagewire:tiny-flux@1")
    figures = {}
    for name in LEAST_PSNR:
        image = await pixels(server, name)
        figures[name] = psnr(image, reference)
        # Not the unquantized weights under another name: quantization changed something.
        assert figures[name] < math.inf, f"{name} made exactly the unquantized image"
    shown = ", ".join(f"{name} {value:.1f} dB" for name, value in figures.items())
    print(f"PSNR against the unquantized image: {shown}")
    assert all(figures[name] >= least for name, least in LEAST_PSNR.items()), f"PSNR against unquantized: {shown}"

    listed = {model["name"]: model for model in await model_search(server.url, "tiny-flux-")}
    assert set(LEAST_PSNR) <= set(listed)
    stored = {"tiny-flux-fp8": "float8-e4m3fn", "tiny-flux-fp8-scaled": "float8-e4m3fn-scaled",
              "tiny-flux-Q8_0": "gguf-q8_0", "tiny-flux-BF16": "gguf-bf16"}
    for name, kind in stored.items():
        model = listed[name]
        assert (model["architecture"], model["category"], model["available"]) == ("tiny-flux", "checkpoint", True)
        assert kind in model["tags"], model["tags"]


async def test_a_gguf_file_loads_from_a_catalog_entry(start_server, quantized_folder: Path, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.json"
    # No architecture stated: it is read from the GGUF file's header.
    catalog.write_text(json.dumps([{"air": "test:flux-gguf@1", "name": "tiny FLUX, Q8_0", "source": "single_file",
                                    "location": str(quantized_folder / "diffusion_models" / "tiny-flux-Q8_0.gguf")}]))
    server = await start_server(catalog_files=(catalog,))
    image = await pixels(server, "test:flux-gguf@1")
    assert psnr(image, await pixels(server, "imagewire:tiny-flux@1")) >= LEAST_PSNR["tiny-flux-Q8_0"]
    [model] = await model_search(server.url, "test:flux-gguf")
    assert model["architecture"] == "tiny-flux"


async def test_the_quantize_flag_reaches_the_models_loaded(start_server, caplog: pytest.LogCaptureFixture) -> None:
    """--quantize int8 through a real server: the FLUX model runs quantized, close to its unquantized image, and the
    plan's log line says what it saved."""
    pytest.importorskip("torchao", reason="the quantize extra (imagewire[quantize]) quantizes on load")
    plain = await start_server()
    reference = await pixels(plain, "imagewire:tiny-flux@1")
    server = await start_server(quantize="int8")
    with caplog.at_level("INFO", logger="imagewire.air_registry.loader"):
        image = await pixels(server, "imagewire:tiny-flux@1")
    assert 45.0 <= psnr(image, reference) < math.inf
    assert "quantized text_encoder_2 and transformer of imagewire:tiny-flux@1 to int8" in caplog.text
    assert "(int8 weights, " in caplog.text
    [model] = [found for found in await model_search(server.url, "imagewire:tiny-flux@1")
               if found["air"] == "imagewire:tiny-flux@1"]
    assert model["loaded"] and model["memoryPlan"] == "all-on-device"
    # What it saved, the figure the load's log line gives.
    assert model["quantization"] == "int8" and model["quantizationSavedBytes"] > 0
    saved = model["quantizationSavedBytes"]
    [unquantized] = [found for found in await model_search(plain.url, "imagewire:tiny-flux@1")
                     if found["air"] == "imagewire:tiny-flux@1"]
    assert unquantized["quantization"] is None and unquantized["quantizationSavedBytes"] is None
    assert f"(int8 weights, {amount(saved)} saved)" in caplog.text
