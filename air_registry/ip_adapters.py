"""How IP-Adapter weights lie on disk, with no torch: the adapter's weights file and the CLIP image encoder that
reads its guide images.

An IP-Adapter is one ``.safetensors`` file (``image_proj.*`` and ``ip_adapter.*`` tensors, the format diffusers'
``load_ip_adapter`` reads) and needs an image encoder (a ``CLIPVisionModelWithProjection`` folder) that it was
trained with. A folder (an embedded build, an operator's folder) holds both: ``ip-adapter.safetensors`` and
``image_encoder/``. A single file, or a file of a hub repo, has its encoder where the h94/IP-Adapter repo puts it:
``image_encoder/`` beside it, but the ``vit-h`` adapters read ``models/image_encoder`` (ViT-H/14) and the ``vit-G``
one ``sdxl_models/image_encoder`` (ViT-bigG/14) whichever folder they are in.
"""

from __future__ import annotations

from pathlib import Path, PurePath, PurePosixPath

from imagewire.air_registry.catalog import ModelEntry, hub_file

CATEGORY = "ip-adapter"
WEIGHTS = "ip-adapter.safetensors"   # the adapter's file in a folder
IMAGE_ENCODER = "image_encoder"
# The files of an image encoder folder that loading reads.
IMAGE_ENCODER_FILES = ("config.json", "model.safetensors")
# h94/IP-Adapter's folders: SD 1.5 adapters and ViT-H/14 in models/, SDXL ones and ViT-bigG/14 in sdxl_models/.
_H94_FOLDERS = {"vit-h": "models", "vit-g": "sdxl_models"}


def encoder_beside(file: PurePath) -> PurePath:
    """The image encoder folder of the adapter weights file ``file``, by h94/IP-Adapter's layout."""
    parent = file.parent
    if parent.name in _H94_FOLDERS.values():
        name = file.name.lower()
        for marker, folder in _H94_FOLDERS.items():
            if marker in name:
                return parent.parent / folder / IMAGE_ENCODER
    return parent / IMAGE_ENCODER


def adapter_files(weights: Path) -> tuple[Path, Path]:
    """The adapter's weights file and its image encoder folder, from where its weights were found (a folder
    holding both, or the weights file)."""
    if weights.is_dir():
        return weights / WEIGHTS, weights / IMAGE_ENCODER
    return weights, Path(encoder_beside(weights))


def image_encoder_key(entry: ModelEntry) -> str:
    """What tells two adapters' image encoders apart without opening anything: adapters of one call share one
    (the pipeline has one image encoder)."""
    if entry.source in ("embedded", "folder"):
        return f"{entry.source}:{entry.location}/{IMAGE_ENCODER}"
    return f"{entry.source}:{encoder_beside(PurePosixPath(entry.location))}"


def hub_encoder_files(entry: ModelEntry) -> list[str]:
    """The files of a hub adapter's image encoder, as paths in its repo: what has to be fetched beside it."""
    _, file = hub_file(entry.location)
    folder = encoder_beside(PurePosixPath(file))
    return [str(folder / name) for name in IMAGE_ENCODER_FILES]
