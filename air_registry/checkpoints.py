"""What a single-file checkpoint is, read from its tensor names and shapes alone.

A ``.safetensors`` file starts with a JSON header naming every tensor with its shape, so the
architecture of a downloaded checkpoint is known without loading a byte of its weights, and
without torch. The names are those of the original model code (``model.diffusion_model.*`` for
the Stable Diffusion UNets, ``double_blocks.*`` for FLUX, ``joint_blocks.*`` for SD 3), which is how
checkpoints are published on Civitai.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imagewire.air_registry.errors import RegistryError
from imagewire.air_registry.quantized import gguf_format, gguf_tensors, is_gguf, safetensors_format

# The JSON header of a file many gigabytes long is still at most a few megabytes.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# SD 1.x and 2.x differ in their text encoder's width, which their UNet's cross-attention reads.
# 32 is the embedded tiny model's (``tiny/sd.py``: CROSS_ATTENTION_DIM).
_SD_CONTEXT_WIDTHS: Mapping[int, str] = {768: "sd15", 1024: "sd21", 32: "tiny"}
_SD_CROSS_ATTENTION = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_SD_UNET = "model.diffusion_model.input_blocks.0.0.weight"
_SDXL_BASE = "conditioner.embedders.1.model.ln_final.weight"
_SDXL_REFINER = "conditioner.embedders.0.model.ln_final.weight"
_FLUX = "double_blocks.0.img_attn.norm.key_norm.scale"
_FLUX_GUIDANCE = "guidance_in.in_layer.weight"
_SD3 = "joint_blocks.0.context_block.attn.qkv.weight"
_SD35_MEDIUM = "joint_blocks.0.x_block.attn2.qkv.weight"  # MMDiT-X's second attention
_INPAINT_CHANNELS = 9
# The embedded tiny FLUX's transformer (``tiny/flux.py``: 2 heads of 16) is 32 wide; FLUX.1's is 3072.
_TINY_FLUX_WIDTH = 32
_FLUX_FILL_CHANNELS = 384  # 64 of latents, 64 of the masked image's, 256 of the mask's, packed
# What a stated architecture may be where the file's tensors say another: Kontext is [dev]'s shapes.
_SAME_SHAPES: Mapping[str, str] = {"flux1-kontext": "flux1-dev"}
# Prefixes that full checkpoints put before the transformer's own names.
_TRANSFORMER_PREFIXES = ("model.diffusion_model.", "")


class UnreadableCheckpoint(RegistryError):
    """Not a safetensors file, or a damaged one."""


class UnknownArchitecture(RegistryError):
    """A checkpoint whose tensors match no architecture this server loads."""


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's name and shape, from the file's header (a safetensors file's, or a GGUF file's)."""
    if is_gguf(path):
        return {name: list(tensor.shape) for name, tensor in gguf_tensors(path).items()}
    return {name: list(entry.get("shape", [])) for name, entry in _safetensors_header(path).items()}


def tensor_dtypes(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor's name, dtype (``F16``, ``F8_E4M3``, …) and shape, from a safetensors file's header."""
    return {name: (str(entry.get("dtype", "")), list(entry.get("shape", [])))
            for name, entry in _safetensors_header(path).items()}


def _safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) != 8:
                raise UnreadableCheckpoint("is not a safetensors file: it is shorter than its header's length")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES:
                raise UnreadableCheckpoint(f"is not a safetensors file: its header would be {length} bytes long")
            header = json.loads(file.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UnreadableCheckpoint(f"is not a readable safetensors file ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise UnreadableCheckpoint("is not a safetensors file: its header is not a JSON object")
    return {name: entry for name, entry in header.items() if name != "__metadata__" and isinstance(entry, dict)}


def _transformer_key(shapes: Mapping[str, Sequence[int]], name: str) -> str | None:
    for prefix in _TRANSFORMER_PREFIXES:
        if prefix + name in shapes:
            return prefix + name
    return None


def detect_architecture(shapes: Mapping[str, Sequence[int]]) -> str:
    """The name of the architecture (``architectures.py``) a checkpoint with these tensors has."""
    if _transformer_key(shapes, _FLUX) is not None:
        image_in = _transformer_key(shapes, "img_in.weight")
        if image_in is not None and list(shapes[image_in])[:1] == [_TINY_FLUX_WIDTH]:
            return "tiny-flux"
        if _transformer_key(shapes, _FLUX_GUIDANCE) is None:
            return "flux1-schnell"
        channels = list(shapes[image_in])[1:] if image_in is not None else [64]
        if channels == [_FLUX_FILL_CHANNELS]:
            return "flux1-fill"
        if channels != [64]:
            # The structural-conditioning models (Canny, Depth) read their guide image's latents too.
            raise UnknownArchitecture(f"is a FLUX.1 [dev] variant reading {channels[0]} input channels (Canny "
                                      "or Depth), which this server does not load from a single file")
        # Kontext has [dev]'s shapes exactly: a catalog entry says so (``matches``).
        return "flux1-dev"
    if _transformer_key(shapes, _SD3) is not None:
        if _transformer_key(shapes, _SD35_MEDIUM) is not None:
            return "sd35-medium"
        blocks = {name.split(".")[-5] for name in shapes if ".context_block.attn.qkv.weight" in name}
        return "sd35-large" if len(blocks) >= 38 else "sd3"
    # An inpainting UNet reads the mask and the masked image's latents beside its own: 9 channels, not 4.
    inpainting = _SD_UNET in shapes and len(shapes[_SD_UNET]) > 1 and list(shapes[_SD_UNET])[1] == _INPAINT_CHANNELS
    if _SDXL_BASE in shapes:
        return "sdxl-inpaint" if inpainting else "sdxl"
    if _SDXL_REFINER in shapes:
        return "sdxl-refiner"
    if _SD_UNET in shapes and _SD_CROSS_ATTENTION in shapes:
        width = list(shapes[_SD_CROSS_ATTENTION])[-1]
        if inpainting and width == 768:
            return "sd15-inpaint"
        if inpainting:
            raise UnknownArchitecture(f"is an inpainting Stable Diffusion UNet with a text width of {width}; only "
                                      "SD 1.x (768) and SDXL inpainting checkpoints load from a single file")
        if width in _SD_CONTEXT_WIDTHS:
            return _SD_CONTEXT_WIDTHS[width]
        raise UnknownArchitecture(
            f"is a Stable Diffusion UNet with a text width of {width}, which no architecture here has "
            f"({', '.join(f'{w}: {name}' for w, name in _SD_CONTEXT_WIDTHS.items())})")
    raise UnknownArchitecture(
        "has tensors of no architecture this server loads from a single file (Stable Diffusion 1.x, 2.x, "
        "XL, FLUX.1, SD 3 and 3.5 in their original layouts)")


def matches(stated: str, detected: str) -> bool:
    """Whether a catalog entry's ``architecture`` fits what its file's tensors say it is."""
    return stated == detected or _SAME_SHAPES.get(stated) == detected


def weights_format(path: Path) -> str | None:
    """How the weights of a checkpoint file are stored when it is quantized (``gguf-q8_0``, ``float8-e4m3fn``),
    from its header; None for a file in an ordinary precision."""
    if is_gguf(path):
        return gguf_format(gguf_tensors(path))
    if Path(path).name.lower().endswith(".safetensors"):
        return safetensors_format(tensor_dtypes(path))
    return None
