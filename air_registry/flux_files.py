"""A FLUX.1 transformer saved alone, in Black Forest Labs' layout (``double_blocks.*``), read into diffusers' model:
the float8 and GGUF files people keep in ComfyUI's ``diffusion_models/``.

The file's tensors are read by diffusers (``load_single_file_checkpoint``: safetensors, or GGUF through the
``gguf`` package, each quantized tensor a ``GGUFParameter``), renamed here into diffusers' names, and given to
``FluxTransformer2DModel.from_single_file``, which loads them as they are when the names already match:

- float8 weights are cast to the compute dtype as they load (diffusers' own behaviour for a float8 file: on
  the CPU there are no float8 matrix products); a ComfyUI scaled float8 file's are multiplied by their
  ``scale_weight`` first (``dequantize_scaled_float8``), which diffusers would otherwise leave out;
- GGUF weights stay quantized (``GGUFQuantizationConfig``): each linear layer dequantizes its weights to the
  compute dtype as it runs, so the model takes the file's size in memory.

The renaming is ours, not diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, because that function
splits the single blocks' fused projection at FLUX.1's width (3072) written into it; here the width is read from
the tensors, so that a transformer of any width (the embedded tiny FLUX's, in tests) loads the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imagewire.air_registry.quantized import (
    INPUT_SCALE_SUFFIX,
    SCALED_FLOAT8_MARKER,
    WEIGHT_SCALE_SUFFIX,
    is_gguf,
    is_scaled_float8,
)

_PREFIX = "model.diffusion_model."

# Whole tensors renamed (weight and bias alike): Black Forest Labs' name → diffusers'. The tests write files in
# Black Forest Labs' layout from these tables too (``tests/quantized_files.py``).
TOP_NAMES = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
DOUBLE_BLOCK_NAMES = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
DOUBLE_BLOCK_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_BLOCK_NAMES = {
    "modulation.lin": "norm.linear", "linear2": "proj_out",
    "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight",
}
SINGLE_BLOCK_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_FINAL_MODULATION = "final_layer.adaLN_modulation.1"


class NotAFluxTransformer(ValueError):
    """A tensor the layout has no place for, or one it needs that is missing."""


def rename(name: str, table: Mapping[str, str]) -> str | None:
    for before, after in table.items():
        if name == before:
            return after
        if name.startswith(before + "."):
            return after + name[len(before):]
    return None


def flux_to_diffusers(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A FLUX.1 transformer's tensors in diffusers' names (``FluxTransformer2DModel``), from Black Forest Labs'
    (with or without full checkpoints' ``model.diffusion_model.`` prefix). Works on plain tensors and on GGUF's
    quantized ones alike: fused projections are split along their rows, which quantization keeps whole."""
    import torch

    state = {name.removeprefix(_PREFIX): tensor for name, tensor in checkpoint.items()}
    if "img_in.weight" not in state:
        raise NotAFluxTransformer("has no img_in.weight: it is not a FLUX.1 transformer")
    width = int(state["img_in.weight"].shape[0])
    out: dict[str, Any] = {}
    for name, tensor in state.items():
        head, _, rest = name.partition(".")
        if head in ("double_blocks", "single_blocks"):
            index, _, inner = rest.partition(".")
            target = f"{'transformer_blocks' if head == 'double_blocks' else 'single_transformer_blocks'}.{index}."
            fused = DOUBLE_BLOCK_FUSED if head == "double_blocks" else {"linear1": SINGLE_BLOCK_FUSED}
            part = next((key for key in fused if inner.startswith(key + ".")), None)
            if part is not None:
                kind = inner[len(part) + 1:]
                # q, k and v are each ``width`` rows; a single block's MLP input takes the rest.
                sizes = [width] * 3 + ([int(tensor.shape[0]) - 3 * width] if head == "single_blocks" else [])
                for piece, value in zip(fused[part], torch.split(tensor, sizes, dim=0), strict=True):
                    out[f"{target}{piece}.{kind}"] = value
                continue
            renamed = rename(inner, DOUBLE_BLOCK_NAMES if head == "double_blocks" else SINGLE_BLOCK_NAMES)
            if renamed is None:
                raise NotAFluxTransformer(f"has a tensor {name!r} a FLUX.1 block has no place for")
            out[target + renamed] = tensor
        elif name.startswith(_FINAL_MODULATION + "."):
            # Black Forest Labs' final norm gives (shift, scale), diffusers' (scale, shift).
            shift, scale = torch.chunk(tensor, 2, dim=0)
            out["norm_out.linear" + name[len(_FINAL_MODULATION):]] = torch.cat([scale, shift], dim=0)
        else:
            renamed = rename(name, TOP_NAMES)
            if renamed is None:
                raise NotAFluxTransformer(f"has a tensor {name!r} a FLUX.1 transformer has no place for")
            out[renamed] = tensor
    return out


def dequantize_scaled_float8(checkpoint: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    """A ComfyUI scaled float8 file's tensors as plain ones in ``dtype``: each weight that has a ``scale_weight``
    multiplied by it (in float32, then cast), the factors and the ``scaled_fp8`` marker left out, and so are the
    ``scale_input`` factors, which only float8 matrix products use."""
    import torch

    out: dict[str, Any] = {}
    for name, tensor in checkpoint.items():
        if name.endswith((WEIGHT_SCALE_SUFFIX, INPUT_SCALE_SUFFIX)) or name.rpartition(".")[2] == SCALED_FLOAT8_MARKER:
            continue
        scale = checkpoint.get(name.removesuffix(".weight") + WEIGHT_SCALE_SUFFIX)
        if scale is None or not name.endswith(".weight"):
            out[name] = tensor
            continue
        factor = scale.to(torch.float32)
        if factor.numel() == 1:
            factor = factor.reshape(())
        elif factor.numel() == tensor.shape[0]:  # one factor per output row
            factor = factor.reshape(-1, *[1] * (tensor.ndim - 1))
        else:
            raise NotAFluxTransformer(f"has a {name!r} of {list(tensor.shape)} with a scale_weight of "
                                      f"{list(scale.shape)}, which fits neither the whole matrix nor its rows")
        out[name] = (tensor.to(torch.float32) * factor).to(dtype)
    for name in checkpoint:
        if name.endswith(WEIGHT_SCALE_SUFFIX) and name.removesuffix(WEIGHT_SCALE_SUFFIX) + ".weight" not in checkpoint:
            raise NotAFluxTransformer(f"has a {name!r} without the weight it scales")
    return out


def read_flux_transformer(path: Path, *, config: Path, dtype: Any, subfolder: str = "transformer") -> Any:
    """The FLUX transformer in the file at ``path`` (float8 or another precision in safetensors, or GGUF), with the
    config at ``config/subfolder``, computing in ``dtype``: GGUF weights stay quantized, others are cast."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    options: dict[str, Any] = {}
    if is_gguf(path):
        from diffusers.quantizers.quantization_config import GGUFQuantizationConfig

        options["quantization_config"] = GGUFQuantizationConfig(compute_dtype=dtype)
    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    if not is_gguf(path) and is_scaled_float8(checkpoint):
        checkpoint = dequantize_scaled_float8(checkpoint, dtype)
    model = FluxTransformer2DModel.from_single_file(
        flux_to_diffusers(checkpoint), config=str(config), subfolder=subfolder, torch_dtype=dtype,
        local_files_only=True, **options)
    return model
