"""Where a model's weights live while it serves: decided before it loads, from sizes alone.

A model is its components (denoiser, text encoders, VAE, …) and each component's bytes in the precision
it runs in. Those come from the safetensors headers of a diffusers folder or a single file (``read_sizes``:
no weights are read), so the decision is made before a byte is loaded. Given the device's budget (what it
has free, or ``--device-memory-gib``) and the memory a call needs beside the weights (``Activations``: the
largest batch at the largest size), ``plan_placement`` picks the fastest placement that fits:

- ``all-on-device``: every component on the device; nothing moves during a call.
- ``text-encoders-on-cpu``: the denoiser and the VAE on the device; each text encoder waits in host RAM and
  is moved in to encode the prompts, then out again (one encoder on the device at a time).
- ``model-offload``: every component waits in host RAM and is moved in whole while it runs (diffusers'
  model offload): the device holds the largest component and the call's activations.
- ``sequential-offload``: the components are moved in block by block while they run (diffusers' group
  offload): the device holds a couple of blocks; slow, the last resort.

When none fits, loading is refused with ``ModelTooLarge``, which says what the model needs and what would
let it load. This module is pure: no torch, no I/O but reading headers.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imagewire.air_registry.errors import RegistryError
from imagewire.air_registry.quantized import GGUF_UNQUANTIZED, gguf_tensors, is_gguf

ALL_ON_DEVICE = "all-on-device"
TEXT_ENCODERS_ON_CPU = "text-encoders-on-cpu"
MODEL_OFFLOAD = "model-offload"
SEQUENTIAL_OFFLOAD = "sequential-offload"
# Fastest first: the first that fits is chosen.
PLACEMENTS = (ALL_ON_DEVICE, TEXT_ENCODERS_ON_CPU, MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD)

DENOISER, TEXT_ENCODER, VAE, OTHER = "denoiser", "text-encoder", "vae", "other"

GIB = 1024**3

# Bytes per element of the dtypes safetensors headers name, and of the precisions models run in.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "float32": 4, "float16": 2, "bfloat16": 2}

# Activation estimates, in bytes per latent pixel (one eighth of the image side each way) of one image, in a
# 2-byte precision: what a call holds beside the weights while it denoises, and while the VAE decodes (per
# output pixel, at its widest layers). Rough on purpose, and on the safe side; ``python -m bench.gpu_quick``
# measures the real peaks to check them against.
DENOISE_BYTES_PER_LATENT_PIXEL = {"unet": 32 * 1024, "transformer": 48 * 1024}
DECODE_BYTES_PER_PIXEL = 3 * 1024
# What the CUDA allocator's fragmentation and the kernels' workspaces take beside the estimates.
FIXED_OVERHEAD = GIB // 2
# Blocks resident at once under sequential (group) offload: the one running and the next, prefetched,
# doubled again because blocks differ in size.
SEQUENTIAL_RESIDENT_BLOCKS = 4

_VARIANT = re.compile(r"\.(fp16|bf16|fp32|non_ema|ema)\.safetensors$")
_BLOCK = re.compile(r"^(.*?(?:blocks?|layers?))\.(\d+)\.")
_SINGLE_FILE_ROLES = (("model.diffusion_model.", DENOISER), ("first_stage_model.", VAE), ("vae.", VAE),
                      ("conditioner.", TEXT_ENCODER), ("cond_stage_model.", TEXT_ENCODER),
                      ("text_encoders.", TEXT_ENCODER))


class ModelTooLarge(RegistryError):
    """No placement fits the model on this device's budget."""


def role_of(component: str) -> str:
    """What a diffusers component does, from its folder name (``text_encoder_2``, ``transformer``, ``vae``)."""
    if component.startswith("text_encoder"):
        return TEXT_ENCODER
    if component in ("unet", "transformer", "prior", "decoder"):
        return DENOISER
    if component == "vae":
        return VAE
    return OTHER


@dataclass(frozen=True)
class ComponentSize:
    name: str
    role: str
    bytes: int
    blocks: int = 1   # repeated blocks (layers) it is made of: what sequential offload moves one at a time

    @property
    def block_bytes(self) -> int:
        return -(-self.bytes // max(1, self.blocks))


@dataclass(frozen=True)
class ModelSize:
    """A model's weights in the precision it runs in, by component."""

    components: tuple[ComponentSize, ...]
    denoiser_kind: str = "unet"   # "unet" or "transformer": which activation estimate applies

    @property
    def total(self) -> int:
        return sum(part.bytes for part in self.components)

    def of(self, role: str) -> list[ComponentSize]:
        return [part for part in self.components if part.role == role]

    @property
    def largest(self) -> int:
        return max((part.bytes for part in self.components), default=0)

    @classmethod
    def of_models(cls, sizes: Iterable[ModelSize]) -> ModelSize:
        """Several models planned as one (a model and its refiner, run by one job)."""
        sizes = list(sizes)
        parts = tuple(ComponentSize(f"{index}/{part.name}", part.role, part.bytes, part.blocks)
                      for index, size in enumerate(sizes) for part in size.components)
        kind = "transformer" if any(size.denoiser_kind == "transformer" for size in sizes) else "unet"
        return cls(parts, kind)


@dataclass(frozen=True)
class Activations:
    """The largest call the server allows: ``batch`` images of ``width`` × ``height``, with ``copies`` latents
    per image through the denoiser (2 with classifier-free guidance)."""

    batch: int
    width: int
    height: int
    dtype_bytes: int = 2
    copies: int = 2

    def denoise_bytes(self, kind: str) -> int:
        latent_pixels = (self.width // 8) * (self.height // 8)
        per_pixel = DENOISE_BYTES_PER_LATENT_PIXEL.get(kind, DENOISE_BYTES_PER_LATENT_PIXEL["transformer"])
        return self.batch * self.copies * latent_pixels * per_pixel * self.dtype_bytes // 2

    def total(self, kind: str) -> int:
        """What a call holds beside the weights at its peak. Decoding is kept within this by tiling and
        slicing (``decode_mode``), so the denoising estimate bounds it."""
        return self.denoise_bytes(kind) + FIXED_OVERHEAD


def decode_bytes(batch: int, width: int, height: int, dtype_bytes: int = 2) -> int:
    """Estimated peak of decoding ``batch`` images of ``width`` × ``height`` at once, beside the VAE's weights."""
    return batch * width * height * DECODE_BYTES_PER_PIXEL * dtype_bytes // 2


# Tile sides tried for a tiled decode, largest first (larger tiles blend fewer seams).
TILE_SIDES = (1024, 512, 256)


@dataclass(frozen=True)
class DecodeMode:
    slicing: bool        # one image at a time
    tiling: bool         # each image in overlapping tiles
    tile_side: int = 0   # pixels, when tiling

    @property
    def name(self) -> str:
        return "+".join(name for name, on in (("sliced", self.slicing), ("tiled", self.tiling)) if on) or "whole"


def decode_mode(headroom: int | None, batch: int, width: int, height: int, dtype_bytes: int = 2) -> DecodeMode:
    """How to decode so that it stays within ``headroom`` bytes (None: unbounded): whole while the batch fits,
    image by image while one image fits, else image by image in tiles."""
    if headroom is None or decode_bytes(batch, width, height, dtype_bytes) <= headroom:
        return DecodeMode(slicing=False, tiling=False)
    if decode_bytes(1, width, height, dtype_bytes) <= headroom:
        return DecodeMode(slicing=batch > 1, tiling=False)
    side = next((side for side in TILE_SIDES if decode_bytes(1, side, side, dtype_bytes) <= headroom), TILE_SIDES[-1])
    return DecodeMode(slicing=batch > 1, tiling=True, tile_side=side)


@dataclass(frozen=True)
class MemoryPlan:
    placement: str
    model_bytes: int          # every weight, wherever it is
    resident_bytes: int       # weights on the device between calls
    peak_bytes: int           # on the device at the peak of a call, weights and activations
    activation_bytes: int
    budget_bytes: int | None  # None: no limit (a CPU without --device-memory-gib)
    device: str = "cpu"
    rejected: tuple[tuple[str, int], ...] = field(default=())   # faster placements, with the peak each needed
    quantization: str = "none"   # weight-only quantization on load (``quantized.QUANTIZE_MODES``)
    saved_bytes: int = 0         # what it saves, against the weights in the model's precision

    @property
    def headroom(self) -> int | None:
        """Bytes a call may use beside the resident weights (decoding's bound)."""
        if self.budget_bytes is None:
            return None
        return max(0, self.budget_bytes - self.resident_bytes - FIXED_OVERHEAD)

    @property
    def host_bytes(self) -> int:
        return self.model_bytes - self.resident_bytes

    def describe(self) -> str:
        budget = "no limit" if self.budget_bytes is None else f"{gib(self.budget_bytes)} budget"
        why = "".join(f"; {name} would need {gib(peak)}" for name, peak in self.rejected)
        quantized = (f" ({self.quantization} weights, {amount(self.saved_bytes)} saved)"
                     if self.quantization != "none" else "")
        return (f"plan {self.placement} on {self.device}: weights {gib(self.model_bytes)}{quantized}, "
                f"{gib(self.resident_bytes)} kept on the device, peak {gib(self.peak_bytes)} of {budget}{why}")


def gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def amount(size: int) -> str:
    """GiB, or MiB below one GiB (the savings of small models)."""
    return gib(size) if size >= GIB else f"{size / 1024**2:.1f} MiB"


def peak_of(placement: str, size: ModelSize, activations: int) -> tuple[int, int]:
    """(resident bytes between calls, peak bytes during a call) of ``placement``."""
    encoders = size.of(TEXT_ENCODER)
    if placement == ALL_ON_DEVICE:
        return size.total, size.total + activations
    if placement == TEXT_ENCODERS_ON_CPU:
        resident = size.total - sum(part.bytes for part in encoders)
        # An encoder runs before the denoiser: its weights and the denoiser's activations never meet.
        return resident, resident + max(max((part.bytes for part in encoders), default=0), activations)
    if placement == MODEL_OFFLOAD:
        return 0, size.largest + activations
    if placement == SEQUENTIAL_OFFLOAD:
        block = max((part.block_bytes for part in size.components), default=0)
        return 0, SEQUENTIAL_RESIDENT_BLOCKS * block + activations
    raise ValueError(f"unknown placement {placement!r}")


def plan_placement(size: ModelSize, *, budget: int | None, activations: int, device: str = "cuda",
                   allowed: Sequence[str] = PLACEMENTS, label: str = "the model") -> MemoryPlan:
    """The fastest of ``allowed`` placements whose peak fits ``budget`` bytes; raises ``ModelTooLarge`` when none
    does. Without a budget every model is all on the device."""
    rejected: list[tuple[str, int]] = []
    for placement in allowed:
        if placement == TEXT_ENCODERS_ON_CPU and not size.of(TEXT_ENCODER):
            continue
        resident, peak = peak_of(placement, size, activations)
        if budget is None or peak <= budget:
            return MemoryPlan(placement, size.total, resident, peak, activations, budget, device, tuple(rejected))
        rejected.append((placement, peak))
    assert budget is not None
    least = min(rejected, key=lambda item: item[1])
    raise ModelTooLarge(
        f"{label} does not fit this device: its weights take {gib(size.total)} and a call needs "
        f"{gib(activations)} more at the largest batch and size, but {gib(budget)} is available. "
        f"The lightest placement, {least[0]}, would need {gib(least[1])}: raise --device-memory-gib to that on a "
        f"device that has it, or lower --max-batch-size")


# ---------------------------------------------------------------- sizes from file headers


def read_header(path: Path) -> dict[str, dict[str, object]]:
    """The tensors of a safetensors file by name (dtype, shape, offsets), from its header alone."""
    with open(path, "rb") as opened:
        (length,) = struct.unpack("<Q", opened.read(8))
        header: dict[str, dict[str, object]] = json.loads(opened.read(length))
    header.pop("__metadata__", None)
    return header


def _elements(shape: object) -> int:
    count = 1
    for dimension in shape if isinstance(shape, list) else ():
        count *= int(dimension)
    return count


def tensor_bytes(info: Mapping[str, object], dtype_bytes: int, quantized: bool = False) -> int:
    """A tensor's bytes once loaded: floating-point tensors are cast to the model's precision, others kept. A
    ``quantized`` one (a linear layer's weight matrix under weight-only int8 or float8) takes a byte per weight
    and a float32 scale per row."""
    stored = str(info.get("dtype", "F32"))
    floating = stored.startswith(("F", "BF"))
    shape = info.get("shape")
    if quantized and floating and isinstance(shape, list) and len(shape) == 2:
        return _elements(shape) + int(shape[0]) * 4
    size = dtype_bytes if floating else DTYPE_BYTES.get(stored, 4)
    return _elements(shape) * size


# Quantization on load (``--quantize``, a catalog entry's ``quantize``): weight-only, of the linear layers of a
# transformer denoiser and of T5. Embedding tables are 2-D but not linear layers: torchao leaves them as they are.
_NOT_LINEAR = ("shared.weight", "embed_tokens.weight", "relative_attention_bias.weight", "pos_embed", "position")
_T5_PREFIXES = ("text_encoders.t5xxl.",)


def _linear_weight(name: str) -> bool:
    return name.endswith(".weight") and not any(part in name for part in _NOT_LINEAR)


def _is_t5(names: Iterable[str]) -> bool:
    return any(name.startswith("encoder.block.") for name in names)


def quantized_components(components: Mapping[str, Mapping[str, object]]) -> set[str]:
    """The components of a pipeline folder that quantization on load quantizes: a transformer and a T5 encoder
    (by its tensors, whatever its folder's name)."""
    return {name for name, tensors in components.items() if name == "transformer" or _is_t5(tensors)}


def _blocks(names: Iterable[str]) -> int:
    """Repeated blocks a component is made of: the distinct ``…blocks.N.`` (or ``layers.N.``) prefixes."""
    found = set()
    for name in names:
        match = _BLOCK.match(name)
        if match is not None:
            found.add((match.group(1), match.group(2)))
    return max(1, len(found))


def component_files(folder: Path) -> dict[str, list[Path]]:
    """The safetensors files diffusers would load for each component of a pipeline folder: a variant's
    (``.fp16.``) only where the component has no plain ones."""
    files: dict[str, list[Path]] = {}
    for weights in sorted(folder.glob("*/*.safetensors")):
        files.setdefault(weights.parent.name, []).append(weights)
    for name, found in files.items():
        plain = [path for path in found if _VARIANT.search(path.name) is None]
        files[name] = plain or found
    return files


def sizes_from_headers(components: Mapping[str, Mapping[str, Mapping[str, object]]], dtype_bytes: int,
                       quantize: str = "none") -> ModelSize:
    """A pipeline's sizes from each component's tensors (name → dtype and shape, as a safetensors header has them),
    with the transformer's and T5's linear layers in a byte per weight where ``quantize`` is int8 or float8."""
    chosen = quantized_components(components) if quantize != "none" else set()
    parts = tuple(ComponentSize(name, role_of(name), sum(
        tensor_bytes(info, dtype_bytes, name in chosen and _linear_weight(key)) for key, info in tensors.items()),
        _blocks(tensors)) for name, tensors in components.items())
    kind = "transformer" if any(part.name == "transformer" for part in parts) else "unet"
    return ModelSize(parts, kind)


def read_folder_sizes(folder: Path, dtype_bytes: int, quantize: str = "none") -> ModelSize:
    components = {}
    for name, files in component_files(folder).items():
        components[name] = {key: info for path in files for key, info in read_header(path).items()}
    return sizes_from_headers(components, dtype_bytes, quantize)


def read_single_file_sizes(path: Path, dtype_bytes: int, quantize: str = "none") -> ModelSize:
    """A single checkpoint file, its tensors grouped by the prefixes of the original layouts; a file of a
    denoiser alone (a FLUX transformer) is all denoiser."""
    header = read_header(path)
    grouped: dict[str, list[str]] = {}
    for key in header:
        role = next((role for prefix, role in _SINGLE_FILE_ROLES if key.startswith(prefix)), DENOISER)
        grouped.setdefault(role, []).append(key)
    kind = "unet" if any(key.startswith("model.diffusion_model.input_blocks") for key in header) else "transformer"

    def quantized(role: str, key: str) -> bool:
        if quantize == "none" or not _linear_weight(key):
            return False
        return (role == DENOISER and kind == "transformer") or key.startswith(_T5_PREFIXES)

    parts = tuple(ComponentSize(role, role, sum(tensor_bytes(header[key], dtype_bytes, quantized(role, key))
                                                for key in keys),
                                _blocks(key.removeprefix("model.diffusion_model.") for key in keys))
                  for role, keys in grouped.items())
    return ModelSize(parts, kind)


def read_gguf_sizes(path: Path, dtype_bytes: int) -> ModelSize:
    """A GGUF file: a denoiser saved alone, whose quantized tensors stay quantized in memory (each layer
    dequantizes its weights as it runs) and whose float ones are cast to the model's precision."""
    tensors = gguf_tensors(path)
    total = sum(tensor.elements * dtype_bytes if tensor.kind in GGUF_UNQUANTIZED else tensor.stored_bytes
                for tensor in tensors.values())
    return ModelSize((ComponentSize(DENOISER, DENOISER, total, _blocks(tensors)),), "transformer")


def read_sizes(path: Path, dtype_bytes: int, quantize: str = "none") -> ModelSize | None:
    """The sizes of the model at ``path`` (a diffusers folder or a single safetensors file), with a transformer's
    and T5's linear layers quantized on load where ``quantize`` says (``quantized.QUANTIZE_MODES``); None when they
    cannot be read from headers (no safetensors files). A GGUF file is quantized already: counted as stored."""
    path = Path(path)
    try:
        if path.is_file() and is_gguf(path):
            return read_gguf_sizes(path, dtype_bytes)
        if path.is_file() and path.suffix == ".safetensors":
            return read_single_file_sizes(path, dtype_bytes, quantize)
        if path.is_dir():
            size = read_folder_sizes(path, dtype_bytes, quantize)
            return size if size.components else None
    except (OSError, ValueError, struct.error, RegistryError):
        return None
    return None
