"""Quantization on load (``--quantize``, a catalog entry's ``quantize``): torchao's weight-only int8 and float8 of a
FLUX transformer and its T5, on CPU. The tiny FLUX runs quantized with an image close to its own; the memory plan
counts the quantized sizes and records what they save; what cannot run is refused, naming why."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imagewire.air_registry.catalog import Catalog
from imagewire.air_registry.errors import CatalogError, WeightsMissing
from imagewire.air_registry.loader import PipelineCache
from imagewire.air_registry.memory_plan import ALL_ON_DEVICE, GIB, Activations, plan_placement, read_sizes
from tests.checkpoints import original_layout_shapes, write_header_only

# The tests that quantize need torchao (the quantize extra); the others run without it.
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="the quantize extra (imagewire[quantize]) quantizes on load")

# Measured on CPU in float32 at this seed: int8 57 dB, float8 47 dB PSNR against the unquantized image. Weights
# read or scaled wrongly make another image altogether, far below these.
LEAST_PSNR = {"int8": 45.0, "float8": 38.0}


def generate(pipe: Any) -> np.ndarray:
    image = pipe("a lighthouse at dawn", num_inference_steps=3, width=128, height=128, max_sequence_length=64,
                 generator=torch.Generator("cpu").manual_seed(21)).images[0]
    return np.asarray(image.convert("RGB")).astype(np.float64)


def psnr(first: np.ndarray, second: np.ndarray) -> float:
    error = float(np.mean((first - second) ** 2))
    return math.inf if error == 0 else 10 * math.log10(255**2 / error)


def entry(tmp_path: Path, **fields: Any):
    """imagewire:tiny-flux@1's weights under a catalog entry of its own, with ``fields`` added."""
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps([{"air": "test:flux@1", "name": "tiny FLUX", "architecture": "tiny-flux",
                                    "source": "embedded", "location": "tiny-flux", **fields}]))
    return Catalog.load([catalog]).resolve("test:flux@1")


@pytest.fixture(scope="module")
def unquantized(tiny_data_dir: Path) -> np.ndarray:
    flux = Catalog.load().resolve("imagewire:tiny-flux@1")
    return generate(PipelineCache(device="cpu", data_dir=tiny_data_dir).load(flux))


@needs_torchao
@pytest.mark.parametrize("mode", ["int8", "float8"])
def test_the_flag_quantizes_the_transformer_and_t5_and_the_image_stays_close(
        mode: str, tiny_data_dir: Path, unquantized: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir, quantize=mode)
    flux = Catalog.load().resolve("imagewire:tiny-flux@1")
    with caplog.at_level(logging.INFO, logger="imagewire.air_registry.loader"):
        pipe = cache.load(flux)
    kind = {"int8": "Int8Tensor", "float8": "Float8Tensor"}[mode]
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == kind
    assert type(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == kind
    # The CLIP encoder and the VAE are left as they are.
    assert all(type(weight) is torch.nn.Parameter for module in (pipe.text_encoder, pipe.vae)
               for weight in module.parameters())
    figure = psnr(generate(pipe), unquantized)
    print(f"{mode}: PSNR {figure:.1f} dB against the unquantized image")
    assert LEAST_PSNR[mode] <= figure < math.inf, f"{mode}: PSNR {figure:.1f} dB against the unquantized image"
    plan = cache.plans[flux.air]
    assert plan.quantization == mode and plan.saved_bytes > 0
    assert f"quantized text_encoder_2 and transformer of {flux.air} to {mode}" in caplog.text
    assert f"({mode} weights, " in caplog.text and " saved)" in caplog.text


def test_a_catalog_entry_chooses_for_itself(tmp_path: Path, tiny_data_dir: Path) -> None:
    quantized = entry(tmp_path, quantize="int8")
    assert PipelineCache(device="cpu", data_dir=tiny_data_dir).quantization_of(quantized) == "int8"
    # "none" in the entry wins over the flag too.
    assert PipelineCache(device="cpu", data_dir=tiny_data_dir, quantize="int8").quantization_of(
        entry(tmp_path, quantize="none")) == "none"
    # UNet models are never quantized: their weights are mostly convolutions.
    tiny = Catalog.load().resolve("imagewire:tiny@1")
    assert PipelineCache(device="cpu", data_dir=tiny_data_dir, quantize="int8").quantization_of(tiny) == "none"
    with pytest.raises(CatalogError, match="'quantize' must be one of none, int8, float8, not 'int4'"):
        entry(tmp_path, quantize="int4")
    catalog = tmp_path / "sd.json"
    catalog.write_text(json.dumps([{"air": "test:sd@1", "name": "tiny SD", "architecture": "tiny",
                                    "source": "embedded", "location": "tiny-sd", "quantize": "int8"}]))
    with pytest.raises(CatalogError, match="'quantize' applies to checkpoints of transformer models"):
        Catalog.load([catalog])


def test_the_memory_plan_counts_quantized_sizes(tiny_data_dir: Path) -> None:
    """Each linear layer's weight of the transformer and T5 in a byte per weight and a float32 scale per row; the
    rest as it was."""
    from imagewire.air_registry.tiny.flux import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    folder = tiny_data_dir / "models" / "imagewire-tiny-flux-1"
    plain, int8 = read_sizes(folder, 4), read_sizes(folder, 4, "int8")
    assert plain is not None and int8 is not None
    expected = 0
    for module in (pipe.transformer, pipe.text_encoder_2):
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                rows, columns = layer.weight.shape
                expected += rows * columns * 4 - (rows * columns + rows * 4)
    assert plain.total - int8.total == expected


def test_a_flux_sized_transformer_quantized_fits_where_it_did_not(tmp_path: Path) -> None:
    """FLUX.1 [dev]'s transformer (12B weights) in bfloat16 does not fit a 16 GiB device whole; in int8 it does, and
    the plan records the gigabytes saved."""
    path = write_header_only(tmp_path / "flux1-dev.safetensors", original_layout_shapes("flux1-dev"), dtype="BF16")
    plain, int8 = read_sizes(path, 2), read_sizes(path, 2, "int8")
    assert plain is not None and int8 is not None
    assert plain.total > 22 * GIB and int8.total < 11.5 * GIB
    activations = Activations(batch=1, width=1024, height=1024, copies=1).total("transformer")
    assert plan_placement(plain, budget=16 * GIB, activations=activations).placement != ALL_ON_DEVICE
    assert plan_placement(int8, budget=16 * GIB, activations=activations).placement == ALL_ON_DEVICE


def test_without_torchao_the_error_names_the_extra(tmp_path: Path, tiny_data_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "torchao" else
                        find_spec(name, *args))
    with pytest.raises(WeightsMissing, match=r"needs the 'quantize' extra \(torchao\): install it with "
                                             r"`pip install 'imagewire\[quantize\]'`"):
        PipelineCache(device="cpu", data_dir=tiny_data_dir).load(entry(tmp_path, quantize="int8"))


@needs_torchao
def test_a_quantization_torchao_cannot_run_here_is_refused_saying_so(tmp_path: Path, tiny_data_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torchao's kernels do not run (a device, a precision), the model is refused when it loads, naming the
    mode, the device and the precision; the server goes on."""
    import torchao.quantization

    def unsupported(module: Any, config: Any) -> None:
        raise NotImplementedError("no int8 weight-only kernel for this dtype")

    monkeypatch.setattr(torchao.quantization, "quantize_", unsupported)
    cache = PipelineCache(device="cpu", data_dir=tiny_data_dir)
    with pytest.raises(WeightsMissing, match=r"cannot be quantized to int8 here: torchao's weight-only int8 does not "
                                             r"run on cpu in float32 \(NotImplementedError: no int8"):
        cache.load(entry(tmp_path, quantize="int8"))
    assert cache.loaded_models == []
