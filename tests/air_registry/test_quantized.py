"""Quantized FLUX files without loading them (headers, detection, memory plan) and with (the layout's renaming, GGUF
weights kept quantized, a clear error without the gguf extra). End to end through a server:
``tests/server/test_quantized_files.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imagewire.air_registry.catalog import Catalog
from imagewire.air_registry.checkpoints import detect_architecture, tensor_shapes, weights_format
from imagewire.air_registry.errors import WeightsMissing
from imagewire.air_registry.flux_files import NotAFluxTransformer, dequantize_scaled_float8, flux_to_diffusers
from imagewire.air_registry.memory_plan import read_sizes
from imagewire.air_registry.quantized import UnreadableGGUF, gguf_tensors
from tests.quantized_files import (
    flux_original_layout,
    tiny_flux_transformer,
    write_float8,
    write_gguf,
    write_scaled_float8,
)


@pytest.fixture(scope="module")
def transformer():
    return tiny_flux_transformer()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, transformer) -> dict[str, Path]:
    pytest.importorskip("gguf", reason="the gguf extra (imagewire[gguf]) writes the test's GGUF files")
    root = tmp_path_factory.mktemp("quantized-files")
    return {"fp8": write_float8(root / "fp8.safetensors", transformer),
            "fp8-scaled": write_scaled_float8(root / "fp8-scaled.safetensors", transformer),
            # Without the marker, with the input factors: told by the weight factors alone.
            "fp8-scaled-unmarked": write_scaled_float8(root / "fp8-scaled-unmarked.safetensors", transformer,
                                                       marker=False, input_scales=True),
            "q8": write_gguf(root / "q8.gguf", "Q8_0", transformer),
            "bf16": write_gguf(root / "bf16.gguf", "BF16", transformer)}


def test_the_original_layout_renames_back_into_diffusers_names_exactly(transformer) -> None:
    state = transformer.state_dict()
    converted = flux_to_diffusers(flux_original_layout(transformer))
    assert set(converted) == set(state)
    assert all(torch.equal(converted[name], state[name]) for name in state)
    # Full checkpoints put the transformer under a prefix: the same tensors.
    prefixed = {f"model.diffusion_model.{name}": value for name, value in flux_original_layout(transformer).items()}
    assert set(flux_to_diffusers(prefixed)) == set(state)
    with pytest.raises(NotAFluxTransformer, match="'double_blocks.0.extra.weight'"):
        flux_to_diffusers({**flux_original_layout(transformer), "double_blocks.0.extra.weight": torch.zeros(1)})


def test_the_gguf_header_is_read_as_the_gguf_package_reads_it(files: dict[str, Path]) -> None:
    from gguf import GGUFReader

    ours = gguf_tensors(files["q8"])
    theirs = GGUFReader(str(files["q8"])).tensors
    assert {tensor.name: (tuple(int(d) for d in reversed(tensor.shape)), tensor.tensor_type.name)
            for tensor in theirs} == {name: (tensor.shape, tensor.kind) for name, tensor in ours.items()}
    assert {tensor.stored_bytes for tensor in ours.values()} and all(
        tensor.stored_bytes == int(reader.n_bytes) for reader in theirs for name, tensor in ours.items()
        if reader.name == name)


def test_quantized_files_are_told_by_their_keys_and_dtypes(files: dict[str, Path]) -> None:
    for path in files.values():
        assert detect_architecture(tensor_shapes(path)) == "tiny-flux"
    assert {name: weights_format(path) for name, path in files.items()} == {
        "fp8": "float8-e4m3fn", "fp8-scaled": "float8-e4m3fn-scaled", "fp8-scaled-unmarked": "float8-e4m3fn-scaled",
        "q8": "gguf-q8_0", "bf16": "gguf-bf16"}


@pytest.mark.parametrize("name", ["fp8-scaled", "fp8-scaled-unmarked"])
def test_scaled_float8_weights_are_multiplied_back_by_their_factors(files: dict[str, Path], transformer,
                                                                    name: str) -> None:
    from safetensors.torch import load_file

    stored = load_file(str(files[name]))
    converted = flux_to_diffusers(dequantize_scaled_float8(stored, torch.float32))
    state = transformer.state_dict()
    assert set(converted) == set(state)  # the factors and the marker are gone
    for key, expected in state.items():
        # float8 e4m3fn keeps 3 bits of mantissa: each weight within 1/16 of its matrix's largest, after scaling.
        assert (converted[key] - expected).abs().max() <= expected.abs().max() / 16, key
    # Read without its factor, a matrix is its stored float8 values: hundreds of times too large.
    raw = stored["double_blocks.0.img_attn.proj.weight"].float()
    assert raw.abs().max() > 100 * state["transformer_blocks.0.attn.to_out.0.weight"].abs().max()


def test_a_scaled_float8_factor_per_row_is_taken_and_one_that_fits_nothing_is_named() -> None:
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).to(torch.float8_e4m3fn)
    rows = dequantize_scaled_float8({"a.weight": weight, "a.scale_weight": torch.tensor([1.0, 2.0, 0.5])},
                                    torch.float32)
    assert torch.equal(rows["a.weight"], torch.tensor([[1.0, 2.0], [6.0, 8.0], [2.5, 3.0]]))
    with pytest.raises(NotAFluxTransformer, match="fits neither the whole matrix nor its rows"):
        dequantize_scaled_float8({"a.weight": weight, "a.scale_weight": torch.ones(2)}, torch.float32)
    with pytest.raises(NotAFluxTransformer, match="without the weight it scales"):
        dequantize_scaled_float8({"b.scale_weight": torch.ones(())}, torch.float32)


def test_a_damaged_gguf_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    with pytest.raises(UnreadableGGUF, match="ends inside its header"):
        tensor_shapes(tmp_path / "cut.gguf")
    (tmp_path / "other.gguf").write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(UnreadableGGUF, match="does not start with 'GGUF'"):
        tensor_shapes(tmp_path / "other.gguf")


def test_the_memory_plan_counts_gguf_weights_at_their_quantized_size(files: dict[str, Path], transformer) -> None:
    """GGUF weights stay quantized in memory (Q8_0: 34 bytes per 32 weights); float8 ones are cast to the model's
    precision as they load, so they count at its size."""
    parameters = sum(parameter.numel() for parameter in transformer.parameters())
    q8, bf16 = read_sizes(files["q8"], 4), read_sizes(files["bf16"], 4)
    fp8 = read_sizes(files["fp8"], 4)
    assert q8 is not None and bf16 is not None and fp8 is not None
    assert fp8.total == parameters * 4
    matrices = sum(p.numel() for p in transformer.parameters() if p.ndim == 2)
    vectors = parameters - matrices
    assert q8.total == matrices * 34 // 32 + vectors * 4
    assert bf16.total == matrices * 2 + vectors * 4
    assert q8.denoiser_kind == "transformer" and q8.components[0].blocks == 2  # a double and a single block


def _gguf_entry(tmp_path: Path, path: Path):
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps([{"air": "test:gguf@1", "name": "tiny FLUX GGUF", "source": "single_file",
                                    "location": str(path)}]))
    return Catalog.load([catalog]).resolve("test:gguf@1")


def test_gguf_weights_stay_quantized_once_loaded(tmp_path: Path, files: dict[str, Path], tiny_data_dir: Path) -> None:
    from imagewire.air_registry.loader import PipelineCache

    entry = _gguf_entry(tmp_path, files["q8"])
    assert entry.architecture == "tiny-flux"  # read from the GGUF header
    pipe = PipelineCache(device="cpu", data_dir=tiny_data_dir).load(entry)
    weight = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == "GGUFParameter" and weight.quant_type.name == "Q8_0"
    assert weight.dtype == torch.uint8  # 34 bytes per 32 weights, dequantized as each layer runs


def test_a_gguf_file_without_the_extra_is_an_error_naming_it(tmp_path: Path, files: dict[str, Path],
                                                            tiny_data_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from imagewire.air_registry.loader import PipelineCache

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "gguf" else
                        find_spec(name, *args))
    entry = _gguf_entry(tmp_path, files["q8"])
    with pytest.raises(WeightsMissing, match=r"is a GGUF file, which needs the 'gguf' extra .*imagewire\[gguf\]"):
        PipelineCache(device="cpu", data_dir=tiny_data_dir).load(entry)


def test_a_flux_sized_gguf_is_detected_and_planned_from_its_header(tmp_path: Path, empty_hf_cache: Path) -> None:
    """A FLUX.1 [dev] transformer in Q8_0 as city96's GGUFs keep it, header only: detected as flux1-dev, counted at
    its quantized size, and, alone in a models folder without text encoders and VAE, refused listing what it lacks
    and where it was looked for (the header is read without loading a weight)."""
    from imagewire.air_registry.loader import PipelineCache
    from imagewire.air_registry.memory_plan import GIB
    from tests.checkpoints import original_layout_shapes
    from tests.quantized_files import write_gguf_header_only

    pytest.importorskip("gguf", reason="the gguf extra (imagewire[gguf]) is needed before the pieces are looked for")
    shapes = original_layout_shapes("flux1-dev")
    path = write_gguf_header_only(tmp_path / "models" / "diffusion_models" / "flux1-dev-Q8_0.gguf", shapes)
    assert detect_architecture(tensor_shapes(path)) == "flux1-dev"
    assert weights_format(path) == "gguf-q8_0"
    size = read_sizes(path, 2)
    assert size is not None
    matrices = sum(a * b for a, b in (shape for shape in shapes.values() if len(shape) == 2))
    assert size.total >= matrices * 34 // 32 and size.total < 12.5 * GIB  # bfloat16 would be 22 GiB
    entry = _gguf_entry(tmp_path, path)
    assert entry.architecture == "flux1-dev"
    with pytest.raises(WeightsMissing, match=r"flux1-dev-Q8_0.gguf\) holds only some of the model: it lacks vae .*"
                                             r"looked for them in .*text_encoders"):
        PipelineCache(device="cpu", data_dir=tmp_path / "data").load(entry)
