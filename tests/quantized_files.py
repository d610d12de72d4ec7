"""Quantized FLUX files for tests, made from the embedded tiny FLUX's transformer (``imagewire:tiny-flux@1``): float8
(e4m3fn) safetensors files, plain and ComfyUI's scaled kind, and GGUF files, in Black Forest Labs' layout
(``double_blocks.*``), as the files people download keep a FLUX transformer.

diffusers reads this layout but does not write it, so it is written here with the inverse of the server's reading
tables (``air_registry/flux_files.py``), the fused projections joined; GGUF files are written with the gguf
package's writer, each weight matrix in the asked quantization and the vectors (biases, norms) in float32, as
published FLUX GGUFs keep them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from imagewire.air_registry.flux_files import DOUBLE_BLOCK_NAMES, SINGLE_BLOCK_NAMES, TOP_NAMES, rename

# Black Forest Labs' names from diffusers', the inverse of the server's reading tables.
_DOUBLE, _SINGLE, _TOP = ({ours: theirs for theirs, ours in table.items()}
                          for table in (DOUBLE_BLOCK_NAMES, SINGLE_BLOCK_NAMES, TOP_NAMES))


def flux_original_layout(transformer: Any) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel``'s weights in Black Forest Labs' names and fused projections."""
    state = transformer.state_dict()
    out: dict[str, torch.Tensor] = {}
    for index in range(transformer.config.num_layers):
        ours = f"transformer_blocks.{index}."
        theirs = f"double_blocks.{index}."
        for kind in ("weight", "bias"):
            out[f"{theirs}img_attn.qkv.{kind}"] = torch.cat([state[f"{ours}attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{theirs}txt_attn.qkv.{kind}"] = torch.cat(
                [state[f"{ours}attn.add_{x}_proj.{kind}"] for x in "qkv"])
    for index in range(transformer.config.num_single_layers):
        ours = f"single_transformer_blocks.{index}."
        for kind in ("weight", "bias"):
            out[f"single_blocks.{index}.linear1.{kind}"] = torch.cat(
                [state[f"{ours}attn.to_{x}.{kind}"] for x in "qkv"] + [state[f"{ours}proj_mlp.{kind}"]])
    for name, tensor in state.items():
        head, _, rest = name.partition(".")
        if head in ("transformer_blocks", "single_transformer_blocks"):
            index, _, inner = rest.partition(".")
            renamed = rename(inner, _DOUBLE if head == "transformer_blocks" else _SINGLE)
            if renamed is not None:
                out[f"{'double_blocks' if head == 'transformer_blocks' else 'single_blocks'}.{index}.{renamed}"] = \
                    tensor
        elif name.startswith("norm_out.linear."):
            scale, shift = torch.chunk(tensor, 2, dim=0)
            out["final_layer.adaLN_modulation.1." + name.rsplit(".", 1)[1]] = torch.cat([shift, scale])
        else:
            renamed = rename(name, _TOP)
            assert renamed is not None, name
            out[renamed] = tensor
    assert sum(t.numel() for t in out.values()) == sum(t.numel() for t in state.values()), "every weight placed"
    return {name: tensor.contiguous() for name, tensor in out.items()}


def tiny_flux_transformer() -> Any:
    from imagewire.air_registry.tiny.flux import build_tiny_pipeline

    return build_tiny_pipeline().transformer


def write_float8(path: Path, transformer: Any | None = None) -> Path:
    """The tiny FLUX transformer with its weight matrices in float8 (e4m3fn), its vectors in bfloat16, as
    published float8 FLUX files are."""
    from safetensors.torch import save_file

    state = flux_original_layout(transformer if transformer is not None else tiny_flux_transformer())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.to(torch.float8_e4m3fn if tensor.ndim == 2 else torch.bfloat16)
               for name, tensor in state.items()}, str(path))
    return path


# float8 e4m3fn's largest value: a scaled file divides each matrix so that its largest weight becomes this.
_FLOAT8_MAX = 448.0


def write_scaled_float8(path: Path, transformer: Any | None = None, *, marker: bool = True,
                        input_scales: bool = False) -> Path:
    """The tiny FLUX transformer as ComfyUI's scaled float8 files keep one: each weight matrix divided by a factor
    that brings its largest weight to float8's largest value, stored as float8 (e4m3fn), the factor beside it as
    ``<layer>.scale_weight`` (float32); the vectors in bfloat16; with ``marker`` the ``scaled_fp8`` tensor, and with
    ``input_scales`` a ``<layer>.scale_input`` per matrix (the factors of ComfyUI's float8 matrix products)."""
    from safetensors.torch import save_file

    state = flux_original_layout(transformer if transformer is not None else tiny_flux_transformer())
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if tensor.ndim != 2:
            out[name] = tensor.to(torch.bfloat16)
            continue
        factor = tensor.abs().max().float() / _FLOAT8_MAX
        layer = name.removesuffix(".weight")
        out[name] = (tensor.float() / factor).to(torch.float8_e4m3fn)
        out[f"{layer}.scale_weight"] = factor.reshape(())
        if input_scales:
            out[f"{layer}.scale_input"] = torch.ones(())
    if marker:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path


def write_gguf(path: Path, quantization: str, transformer: Any | None = None) -> Path:
    """The tiny FLUX transformer as a GGUF file, its weight matrices in ``quantization`` (``Q8_0``, ``BF16``,
    …: one the gguf package can write), its vectors in float32."""
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType[quantization]
    state = flux_original_layout(transformer if transformer is not None else tiny_flux_transformer())
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for name, tensor in state.items():
        data = tensor.float().numpy()
        if tensor.ndim < 2:
            writer.add_tensor(name, data.astype(np.float32))
            continue
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_gguf_header_only(path: Path, shapes: dict[str, tuple[int, ...]], quantization: int = 8) -> Path:
    """A GGUF file that has its header and no data (version 3, no metadata): what detection and the memory plan read,
    without gigabytes of weights. Matrices in ``quantization`` (ggml's type number; 8 is Q8_0), vectors in F32."""
    import struct

    def text(value: str) -> bytes:
        encoded = value.encode("utf-8")
        return struct.pack("<Q", len(encoded)) + encoded

    header = b"GGUF" + struct.pack("<IQQ", 3, len(shapes), 0)
    for name, shape in shapes.items():
        # ggml lists dimensions innermost first.
        header += text(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape))
        header += struct.pack("<IQ", quantization if len(shape) == 2 else 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header)
    return path
