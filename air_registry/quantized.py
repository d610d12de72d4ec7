"""Quantized checkpoint files, read from their headers alone: GGUF files and float8 safetensors.

The quantized FLUX files people run on 16–24 GB cards come in two kinds:

- **float8 safetensors** (``flux1-dev-fp8.safetensors``): an ordinary safetensors file whose weight matrices are
  stored as ``F8_E4M3`` (one byte each). Its names and shapes are the original layout's, so detection reads it
  as any other; its dtype says it is float8. ComfyUI's *scaled* float8 files (``flux1-dev-fp8-scaled``) divide
  each matrix by a factor before casting it, so that its values use float8's whole range, and keep that factor
  beside it (``<layer>.scale_weight``, float32; many also a ``scaled_fp8`` marker tensor and ``scale_input``
  factors for float8 matrix products): the header's names say so, and the weights are multiplied back on load.
- **GGUF** (``flux1-dev-Q8_0.gguf``, ``…-Q4_K_S.gguf``): llama.cpp's container, with the transformer's tensors
  in the original layout's names, each in a block quantization (``Q8_0``: 32 weights in 34 bytes, …). diffusers
  reads them through the ``gguf`` package (an optional extra here) and keeps them quantized in memory,
  dequantizing each layer's weights as it runs.

The GGUF header is read here without the ``gguf`` package, so that a models folder lists (and detects) a GGUF
file on a server without the extra, and loading it answers an error naming the extra rather than failing
somewhere inside diffusers. Pure Python: no torch.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from imagewire.air_registry.errors import RegistryError, WeightsMissing

# Quantization on load (``quantize.py``): none, or weight-only int8 or float8 of a transformer and T5.
QUANTIZE_MODES: tuple[str, ...] = ("none", "int8", "float8")

GGUF_SUFFIX = ".gguf"
GGUF_EXTRA = "gguf"
GGUF_INSTALL = "pip install 'imagewire[gguf]'"
_GGUF_MAGIC = b"GGUF"
# A header that says it holds more than this many tensors or metadata items is damaged, not a model.
_MAX_ITEMS = 1_000_000
_MAX_STRING = 64 * 1024 * 1024

# ggml's tensor types: name, weights per block, bytes per block (gguf-py's GGML_QUANT_SIZES).
GGML_TYPES: Mapping[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
}
# Kept as they are by diffusers (plain torch tensors, cast to the model's precision); the rest stay quantized.
GGUF_UNQUANTIZED = frozenset({"F32", "F16"})

# The metadata value types of a GGUF header: struct format of the fixed-size ones.
_SCALARS: Mapping[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                               11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class UnreadableGGUF(RegistryError):
    """Not a GGUF file, or a damaged one."""


@dataclass(frozen=True)
class GGUFTensor:
    shape: tuple[int, ...]   # in torch's order (the header lists ggml's, innermost first)
    kind: str                # ggml's type name: Q8_0, F16, …

    @property
    def elements(self) -> int:
        count = 1
        for dimension in self.shape:
            count *= dimension
        return count

    @property
    def stored_bytes(self) -> int:
        """Bytes it takes as stored (and, quantized, in memory)."""
        _, block, size = next(item for item in GGML_TYPES.values() if item[0] == self.kind)
        return -(-self.elements // block) * size


def is_gguf(path: Path) -> bool:
    return Path(path).name.lower().endswith(GGUF_SUFFIX)


def _read(file: BinaryIO, size: int) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise UnreadableGGUF("is not a GGUF file: it ends inside its header")
    return data


def _unpack(file: BinaryIO, fmt: str) -> int | float | bool:
    value: int | float | bool = struct.unpack(fmt, _read(file, struct.calcsize(fmt)))[0]
    return value


def _string(file: BinaryIO) -> str:
    length = int(_unpack(file, "<Q"))
    if length > _MAX_STRING:
        raise UnreadableGGUF(f"is not a GGUF file: its header has a string {length} bytes long")
    return _read(file, length).decode("utf-8", errors="replace")


def _skip_value(file: BinaryIO, kind: int) -> None:
    if kind in _SCALARS:
        _read(file, struct.calcsize(_SCALARS[kind]))
    elif kind == _STRING:
        _string(file)
    elif kind == _ARRAY:
        item_kind, count = int(_unpack(file, "<I")), int(_unpack(file, "<Q"))
        if count > _MAX_STRING:
            raise UnreadableGGUF(f"is not a GGUF file: its header has an array of {count} items")
        if item_kind in _SCALARS:
            _read(file, count * struct.calcsize(_SCALARS[item_kind]))
        else:
            for _ in range(count):
                _skip_value(file, item_kind)
    else:
        raise UnreadableGGUF(f"is not a GGUF file: its header has a value of unknown type {kind}")


def gguf_tensors(path: Path) -> dict[str, GGUFTensor]:
    """Every tensor of a GGUF file by name, with its shape and type, from the file's header."""
    try:
        with open(path, "rb") as file:
            if _read(file, 4) != _GGUF_MAGIC:
                raise UnreadableGGUF("is not a GGUF file (it does not start with 'GGUF')")
            version = int(_unpack(file, "<I"))
            if version < 2:
                raise UnreadableGGUF(f"is a GGUF file of version {version}, older than any diffusers reads")
            tensor_count, kv_count = int(_unpack(file, "<Q")), int(_unpack(file, "<Q"))
            if tensor_count > _MAX_ITEMS or kv_count > _MAX_ITEMS:
                raise UnreadableGGUF("is not a GGUF file: its header's counts are out of range")
            for _ in range(kv_count):
                _string(file)
                _skip_value(file, int(_unpack(file, "<I")))
            tensors: dict[str, GGUFTensor] = {}
            for _ in range(tensor_count):
                name = _string(file)
                dimensions = int(_unpack(file, "<I"))
                if dimensions > 8:
                    raise UnreadableGGUF(f"is not a GGUF file: its tensor {name!r} has {dimensions} dimensions")
                shape = [int(_unpack(file, "<Q")) for _ in range(dimensions)]
                kind = int(_unpack(file, "<I"))
                _unpack(file, "<Q")  # where its data is: not needed to tell what it is
                if kind not in GGML_TYPES:
                    raise UnreadableGGUF(f"has a tensor {name!r} of a type ({kind}) this server does not know")
                tensors[name] = GGUFTensor(tuple(reversed(shape)), GGML_TYPES[kind][0])
    except OSError as exc:
        raise UnreadableGGUF(f"is not a readable GGUF file ({type(exc).__name__})") from exc
    return tensors


def gguf_format(tensors: Mapping[str, GGUFTensor]) -> str:
    """How a GGUF file's weights are stored, by its most common quantized type (``gguf-q8_0``); ``gguf-f16`` and
    the like when none is quantized."""
    kinds = Counter(tensor.kind for tensor in tensors.values() if tensor.kind not in GGUF_UNQUANTIZED)
    if not kinds:
        kinds = Counter(tensor.kind for tensor in tensors.values())
    return f"gguf-{kinds.most_common(1)[0][0].lower()}" if kinds else "gguf"


# safetensors dtype names of float8 weights, and what this server calls them.
FLOAT8_DTYPES: Mapping[str, str] = {"F8_E4M3": "float8-e4m3fn", "F8_E5M2": "float8-e5m2"}


# ComfyUI's scaled float8 files: the marker tensor some carry, each matrix's factor, and the factors of the inputs
# its float8 matrix products scale (not needed once the weights are multiplied back).
SCALED_FLOAT8_MARKER = "scaled_fp8"
WEIGHT_SCALE_SUFFIX = ".scale_weight"
INPUT_SCALE_SUFFIX = ".scale_input"


def is_scaled_float8(names: Iterable[str]) -> bool:
    """Whether tensors ``names`` are a ComfyUI scaled float8 file's: a ``scaled_fp8`` marker, or weight factors."""
    return any(name == SCALED_FLOAT8_MARKER or name.endswith(("." + SCALED_FLOAT8_MARKER, WEIGHT_SCALE_SUFFIX))
               for name in names)


def safetensors_format(tensors: Mapping[str, tuple[str, Sequence[int]]]) -> str | None:
    """``float8-e4m3fn`` (or ``-e5m2``) for a safetensors file whose weights are mostly float8 (by their tensors'
    dtypes and shapes: the matrices are float8, the many small vectors often not), ``float8-e4m3fn-scaled`` for a
    ComfyUI scaled one; None for any other."""
    elements: Counter[str] = Counter()
    for dtype, shape in tensors.values():
        count = 1
        for dimension in shape:
            count *= int(dimension)
        elements[dtype] += count
    if not elements:
        return None
    dtype, _ = elements.most_common(1)[0]
    stored = FLOAT8_DTYPES.get(dtype)
    if stored is not None and is_scaled_float8(tensors):
        return f"{stored}-scaled"
    return stored


class MissingExtra(WeightsMissing):
    """An optional part of the server that a model needs is not installed; the message names the extra."""


def require_gguf(what: str) -> None:
    """Raise ``MissingExtra`` naming the extra when the ``gguf`` package, which reads GGUF files, is not installed.
    ``what`` begins the message (``the file of model X (path)``)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise MissingExtra(
            f"{what} is a GGUF file, which needs the '{GGUF_EXTRA}' extra to load (the gguf package): install it "
            f"with `{GGUF_INSTALL}`")
