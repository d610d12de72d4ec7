"""Super-resolution networks through spandrel: it recognises ESRGAN, Real-ESRGAN, SwinIR, HAT and dozens
more from a weights file alone (architecture, scale, channels), and runs them behind one interface.

spandrel imports torchvision for two architectures this server never loads (LaMa inpainting and
RestoreFormer face restoration). torchvision has no CPU build on the Python package index, so where it
is missing (or built for another torch) spandrel is imported with a stand-in that fails only if one of
those two is used.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import Any

from imagewire.air_registry.errors import WeightsMissing

_STAND_IN = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
_IMPORT_LOCK = threading.Lock()


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _missing_torchvision(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("this model needs torchvision, which is not installed on this server")


def _torchvision_works() -> bool:
    try:
        importlib.import_module("torchvision.transforms.functional")
    except Exception:
        # A torchvision built for another torch fails at import with errors of its own; drop what it left.
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def import_spandrel() -> Any:
    """The spandrel package, imported once (with the torchvision stand-in where needed)."""
    with _IMPORT_LOCK:
        if "spandrel" in sys.modules:
            return sys.modules["spandrel"]
        if importlib.util.find_spec("spandrel") is None:
            raise WeightsMissing(
                "upscaling needs the spandrel package, which is not installed on this server: pip install "
                "'imagewire[upscale]' (with a CPU torch: pip install --no-deps 'spandrel>=0.4,<0.5' einops)")
        if _torchvision_works():
            return importlib.import_module("spandrel")
        functional = types.ModuleType("torchvision.transforms.functional")
        functional.InterpolationMode = _InterpolationMode  # type: ignore[attr-defined]
        functional.rotate = functional.normalize = _missing_torchvision  # type: ignore[attr-defined]
        modules = {name: types.ModuleType(name) for name in _STAND_IN[:2]}
        modules["torchvision.transforms"].functional = functional  # type: ignore[attr-defined]
        modules["torchvision"].transforms = modules["torchvision.transforms"]  # type: ignore[attr-defined]
        modules[_STAND_IN[2]] = functional
        sys.modules.update(modules)
        try:
            return importlib.import_module("spandrel")
        finally:
            # Others (transformers, diffusers) ask whether torchvision is installed; it still is not.
            for name in _STAND_IN:
                sys.modules.pop(name, None)


def load_upscaler(path: Path, *, device: str, half: bool) -> Any:
    """A spandrel image model descriptor for the weights at ``path`` (a file, or a folder holding one).

    Raises ``ValueError`` when the file is not a super-resolution model spandrel knows.
    """
    spandrel = import_spandrel()
    if path.is_dir():
        files = sorted(file for file in path.iterdir() if file.suffix in (".safetensors", ".pth", ".pt", ".ckpt"))
        if len(files) != 1:
            raise ValueError(f"{path} must hold exactly one weights file, not {len(files)}")
        path = files[0]
    descriptor = spandrel.ModelLoader(device="cpu").load_from_file(str(path))
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
        raise ValueError(f"{path.name} is a {descriptor.architecture.name} {descriptor.purpose} model, "
                         "not a super-resolution model")
    if half and descriptor.supports_half:
        descriptor.model.half()
    descriptor.to(device)
    descriptor.eval()
    return descriptor
