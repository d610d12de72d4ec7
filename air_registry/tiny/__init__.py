"""Models the server builds itself: real architectures with random weights, made from fixed seeds with
no download, so that every code path runs on any machine (tests, benchmarks, trying the API).

An ``embedded`` catalog entry names its builder in ``location``; ``BUILDERS`` maps each name to the
module that builds it (imported only when a model is built, so this package's top imports no torch).
A builder module has ``build(directory)``, which saves the model there in diffusers format (or, with a
``MARKER`` naming the file that shows a build is complete, in another layout: a LoRA's or an embedding's
weights file, a single model's config.json).
``ensure_embedded`` builds into a temporary sibling and renames it into place, so a model folder is
either absent or complete, even when two processes build it at once.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from imagewire.air_registry.model_files import MODEL_INDEX

BUILDERS: Mapping[str, str] = MappingProxyType({
    "tiny-sd": "imagewire.air_registry.tiny.sd",
    "tiny-lora": "imagewire.air_registry.tiny.lora",
    "tiny-embedding": "imagewire.air_registry.tiny.embedding",
    "tiny-vae": "imagewire.air_registry.tiny.vae",
    "tiny-sdxl": "imagewire.air_registry.tiny.sdxl",
    "tiny-sdxl-refiner": "imagewire.air_registry.tiny.sdxl_refiner",
    "tiny-upscaler": "imagewire.air_registry.tiny.upscaler",
    "tiny-background": "imagewire.air_registry.tiny.background",
    "tiny-caption": "imagewire.air_registry.tiny.caption",
    "tiny-prompt": "imagewire.air_registry.tiny.prompt",
    "tiny-masking": "imagewire.air_registry.tiny.masking",
    "tiny-sd-inpaint": "imagewire.air_registry.tiny.inpaint",
    "tiny-controlnet": "imagewire.air_registry.tiny.controlnet",
    "tiny-safety": "imagewire.air_registry.tiny.safety",
    "tiny-flux": "imagewire.air_registry.tiny.flux",
    "tiny-flux-kontext": "imagewire.air_registry.tiny.flux_kontext",
    "tiny-sd3": "imagewire.air_registry.tiny.sd3",
    "tiny-ip-adapter": "imagewire.air_registry.tiny.ip_adapter",
})

# Builders draw initial weights from torch's global generator, seeded per component: two builds in one
# process at once would interleave their draws, so builds in a process take turns.
_BUILD_LOCK = threading.Lock()


def ensure_embedded(builder: str, path: Path) -> Path:
    """Make sure the model of ``builder`` is saved at ``path``; build it if it is not."""
    path = Path(path)
    module = importlib.import_module(BUILDERS[builder])
    marker = getattr(module, "MARKER", MODEL_INDEX)
    if (path / marker).is_file():
        return path
    with _BUILD_LOCK:
        if (path / marker).is_file():
            return path  # built by another thread while this one waited
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
        try:
            module.build(staging)
            _move_into_place(staging, path, marker)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _move_into_place(staging: Path, path: Path, marker: str = MODEL_INDEX) -> None:
    try:
        os.replace(staging, path)
        return
    except OSError:
        # ``path`` exists and is not empty: either another build finished first, or a stale,
        # incomplete directory is in the way.
        if (path / marker).is_file():
            return
    stale = Path(tempfile.mkdtemp(prefix=f".{path.name}.stale-", dir=path.parent))
    try:
        try:
            os.replace(path, stale / "model")
        except FileNotFoundError:
            pass  # another build moved it away already
        try:
            os.replace(staging, path)
        except OSError:
            if not (path / marker).is_file():
                raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)
