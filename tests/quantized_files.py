"""Quantized FLUX files for tests, made from the embedded tiny FLUX's transformer (``imagewire:tiny-flux@1``): a
float8 (e4m3fn) safetensors file and GGUF files, in Black Forest Labs' layout (``double_blocks.*``), as the files
people download keep a FLUX transformer.

diffusers reads this layout but does not write it, so the renaming is spelled out here (the inverse of
``air_registry/flux_files.py``); GGUF files are written with the gguf package's writer, each weight matrix in
the asked quantization and the vectors (biases, norms) in float32, as published FLUX GGUFs keep them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
           "attn.norm_k": "norm.key_norm"}
_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
}


def _renamed(name: str, table: dict[str, str]) -> str | None:
    for ours, theirs in table.items():
        if name.startswith(ours + "."):
            kind = name[len(ours) + 1:]
            # Black Forest Labs' RMS norms name their weight ``scale``.
            return f"{theirs}.{'scale' if theirs.endswith('_norm') else kind}"
    return None


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
            renamed = _renamed(inner, _DOUBLE if head == "transformer_blocks" else _SINGLE)
            if renamed is not None:
                out[f"{'double_blocks' if head == 'transformer_blocks' else 'single_blocks'}.{index}.{renamed}"] = \
                    tensor
        elif name.startswith("norm_out.linear."):
            scale, shift = torch.chunk(tensor, 2, dim=0)
            out["final_layer.adaLN_modulation.1." + name.rsplit(".", 1)[1]] = torch.cat([shift, scale])
        else:
            renamed = _renamed(name, _TOP)
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
