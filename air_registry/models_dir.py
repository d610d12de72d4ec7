"""Models folders (``--models-dir``): each weights file in a ComfyUI or AUTOMATIC1111 models folder as a catalog
model, with no catalog file to write.

A folder is read by the names of its subfolders, in either layout (names compared without case):

    ComfyUI            AUTOMATIC1111        category
    checkpoints/       Stable-diffusion/    checkpoint
    diffusion_models/, unet/                checkpoint (a denoiser saved alone)
    loras/             Lora/                lora
    vae/               VAE/                 vae
    embeddings/        embeddings/          embeddings
    controlnet/        ControlNet/          controlnet
    upscale_models/    ESRGAN/              upscaler (imageUpscale)
    text_encoders/, clip/                   pieces that complete a denoiser saved alone (not catalog models)

Each file becomes a model with a stable AIR, ``local:<name-slug>@<first 8 hex digits of its SHA-256>``: the same
file has the same AIR on every server and after every rename of its folder, and a changed file a new one. Its file
name without extension is its alias. Hashing a multi-gigabyte file takes seconds, so each hash is kept in
``DATA_DIR/models-dir-hashes.json`` by (path, size, modification time) and computed once.

Files are only ever read from the folders named: a symbolic link that leads out of its models folder is refused,
and so is anything that is not a regular file. A file that cannot be read, or whose architecture cannot be told,
is listed as unavailable with the reason (``ModelEntry.problem``); it never stops a start. Requests name models
by AIR or alias only, so no name in a request reaches the file system.

Pure Python: nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from imagewire.air_registry.catalog import ModelEntry, parse_entry, usual_defaults
from imagewire.air_registry.checkpoints import detect_architecture, tensor_shapes, weights_format
from imagewire.air_registry.errors import CatalogError, RegistryError, shown

logger = logging.getLogger(__name__)

SOURCE = "local"
# How often the folders are looked at again for new, changed and removed files (a stat of each file).
RESCAN_SECONDS = 5.0
HASHES_FILE = "models-dir-hashes.json"
UNKNOWN = "unknown"  # the architecture of a file that cannot be told (``architectures.py``)

# Subfolder (case-folded) → the category of its files.
FOLDERS: Mapping[str, str] = MappingProxyType({
    "checkpoints": "checkpoint", "stable-diffusion": "checkpoint", "diffusion_models": "checkpoint",
    "unet": "checkpoint", "loras": "lora", "lora": "lora", "vae": "vae", "embeddings": "embeddings",
    "controlnet": "controlnet", "upscale_models": "upscaler", "esrgan": "upscaler",
})
PIECE_FOLDERS: tuple[str, ...] = ("text_encoders", "clip")
_SUFFIXES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "checkpoint": (".safetensors", ".ckpt", ".gguf"), "lora": (".safetensors",), "vae": (".safetensors",),
    "embeddings": (".safetensors",), "controlnet": (".safetensors",), "upscaler": (".safetensors", ".pth", ".pt"),
})
_CHUNK = 4 * 1024 * 1024

# The width of the text a UNet attends to names its family (LoRAs, ControlNets, embeddings read it too).
# 32 is the embedded tiny model's (``tiny/sd.py``), as in ``checkpoints.py``: its add-ons are told apart too.
_TEXT_WIDTHS: Mapping[int, str] = MappingProxyType({768: "sd15", 1024: "sd21", 2048: "sdxl", 32: "tiny"})


@dataclass(frozen=True)
class FoundFile:
    path: Path           # as found under its models folder (never a link out of it)
    category: str
    size: int
    mtime_ns: int


def slug(stem: str) -> str:
    """An AIR id from a file name: lower case, runs of other characters as one '-'."""
    text = re.sub(r"[^a-z0-9_.]+", "-", stem.lower()).strip("-.")
    return text or "model"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve(strict=True).relative_to(root)
    except (OSError, ValueError, RuntimeError):
        return False
    return True


def find_files(models_dirs: Sequence[Path]) -> Iterator[FoundFile | tuple[Path, str]]:
    """Every weights file of the known subfolders of ``models_dirs``; a refused one as (path, reason)."""
    for models_dir in models_dirs:
        try:
            root = Path(models_dir).resolve(strict=True)
            children = sorted(root.iterdir())
        except OSError as exc:
            yield Path(models_dir), f"cannot be read as a models folder ({exc.strerror or type(exc).__name__})"
            continue
        for child in children:
            category = FOLDERS.get(child.name.casefold())
            if category is None or not child.is_dir() or not _inside(child, root):
                continue
            # Links to folders are not followed: everything below is inside the models folder by its path.
            for folder, subfolders, files in os.walk(child, followlinks=False):
                subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
                for name in sorted(files):
                    path = Path(folder) / name
                    if name.startswith(".") or not name.lower().endswith(_SUFFIXES[category]):
                        continue
                    if not _inside(path, root):
                        yield path, "is a link to a file outside its models folder, which is never read"
                        continue
                    try:
                        stat = path.stat()
                    except OSError as exc:
                        yield path, f"cannot be read ({exc.strerror or type(exc).__name__})"
                        continue
                    if not path.is_file():
                        yield path, "is not a regular file"
                        continue
                    yield FoundFile(path, category, stat.st_size, stat.st_mtime_ns)


def pieces(models_dirs: Sequence[Path]) -> list[Path]:
    """The text encoder files (``text_encoders/``, ``clip/``) and VAE files of ``models_dirs``, which complete a
    denoiser saved alone (``single_file.py``)."""
    found = []
    for models_dir in models_dirs:
        try:
            root = Path(models_dir).resolve(strict=True)
            children = sorted(root.iterdir())
        except OSError:
            continue
        for child in children:
            if child.name.casefold() in (*PIECE_FOLDERS, "vae") and child.is_dir():
                found += [path for path in sorted(child.rglob("*.safetensors")) if _inside(path, root)]
    return found


class HashCache:
    """SHA-256 of files by (path, size, modification time), kept in ``DATA_DIR/models-dir-hashes.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._hashes: dict[str, dict[str, Any]] = {}
        self._changed = False
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                self._hashes = {key: value for key, value in loaded.items() if isinstance(value, dict)}
        except (OSError, ValueError):
            pass  # none yet, or damaged: hashes are computed again

    def sha256(self, found: FoundFile) -> str:
        key = str(found.path)
        known = self._hashes.get(key)
        if known and known.get("size") == found.size and known.get("mtime_ns") == found.mtime_ns:
            return str(known["sha256"])
        # Seconds per gigabyte: said, so that a first start over a large folder is not taken for a hang.
        logger.info("models folder: hashing %s (%.1f GB) once; kept in %s", found.path, found.size / 1e9, self.path)
        digest = hashlib.sha256()
        with open(found.path, "rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
        self._hashes[key] = {"size": found.size, "mtime_ns": found.mtime_ns, "sha256": digest.hexdigest()}
        self._changed = True
        return digest.hexdigest()

    def save(self, keep: Iterable[Path]) -> None:
        """Write the hashes of the files in ``keep`` (the others were removed or changed), atomically."""
        kept = {str(path) for path in keep}
        if not self._changed and kept == set(self._hashes):
            return
        self._hashes = {key: value for key, value in self._hashes.items() if key in kept}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(self._hashes, file, indent=1, sort_keys=True)
        os.replace(staging, self.path)
        self._changed = False


def _width_of(shapes: Mapping[str, Sequence[int]], endings: tuple[str, ...], axis: int = -1) -> int | None:
    for name in sorted(shapes):
        if name.endswith(endings) and len(shapes[name]) >= 2:
            return int(list(shapes[name])[axis])
    return None


# LyCORIS algorithms other than LoCon (which is kohya's LoRA on convolutions too, and loads as one), each told by
# the tensor names it writes. diffusers' LoRA loading has no layers for them.
_UNLOADABLE_LORA_FORMATS = (
    (r"\.hada_w1_", "LyCORIS LoHa (Hadamard-product factors: hada_w1_a, hada_w2_a, ...)"),
    (r"\.lokr_w1", "LyCORIS LoKr (Kronecker-product factors: lokr_w1, lokr_w2, ...)"),
    (r"\.oft_blocks$", "LyCORIS OFT/BOFT (orthogonal fine-tuning blocks)"),
    (r"\.oft_diag$", "LyCORIS diag-OFT (orthogonal fine-tuning blocks)"),
    # FLUX trainers' bias and norm differences (``.diff_b``, ``.norm….diff``) are filtered out by diffusers.
    (r"^lora_unet_(?!.*norm).*\.diff$", "LyCORIS full fine-tune differences (.diff tensors)"),
)


class UnloadableLoraFormat(RegistryError):
    """A LoRA-like file in a format diffusers has no layers for."""


class NotOfCategory(RegistryError):
    """A file whose tensors are not a model of the category it was given as (a LoRA as a ControlNet)."""


def unloadable_lora_format(names: Iterable[str]) -> str | None:
    """The name of the LyCORIS format whose tensors ``names`` are, where diffusers cannot load it; else None."""
    listed = list(names)
    for marker, format_name in _UNLOADABLE_LORA_FORMATS:
        if any(re.search(marker, name) for name in listed):
            return format_name
    return None


def add_on_architecture(category: str, shapes: Mapping[str, Sequence[int]], name: str = "") -> str:
    """The architecture a LoRA, embedding, VAE or ControlNet fits, from its tensors (and for a VAE its file
    ``name``); RegistryError if none."""
    names = list(shapes)
    if category == "lora":
        unloadable = unloadable_lora_format(names)
        if unloadable is not None:
            raise UnloadableLoraFormat(f"is a {unloadable}, a format this server does not load")
        if any("double_blocks" in name or "single_transformer_blocks" in name for name in names):
            return "flux1-dev"
        # A FLUX LoRA of the double-stream blocks alone (diffusers' and ai-toolkit's names): FLUX.1's joint
        # attention is 3072 wide (SD 3's, with the same names, 1536 or 2432).
        if _width_of(shapes, ("attn.add_q_proj.lora_A.weight", "attn.to_q.lora_A.weight")) == 3072 and any(
                ".attn.add_q_proj." in name or ".attn.to_add_out." in name for name in names):
            return "flux1-dev"
        # The key projection of cross-attention reads the text's width: kohya's and diffusers' names.
        width = _width_of(shapes, ("attn2_to_k.lora_down.weight", "attn2.to_k.lora_down.weight",
                                   "attn2.to_k.lora_A.weight", "attn2_to_k.lora_A.weight"))
        if width is not None and width in _TEXT_WIDTHS:
            return _TEXT_WIDTHS[width]
        raise RegistryError("is a LoRA of no architecture this server tells apart (SD 1.x, 2.x, XL, FLUX.1)")
    if category == "embeddings":
        return _embedding_architecture(shapes)
    if category == "vae":
        channels = _width_of(shapes, ("decoder.conv_in.weight",), axis=1)
        if channels == 16:
            return "flux1-dev"
        if channels == 4:
            # SD 1.x and SDXL VAEs have the same shapes; the file name is the only hint there is.
            return "sdxl" if "xl" in name.lower() else "sd15"
        raise RegistryError("is not a VAE this server tells apart (4 or 16 latent channels)")
    if category == "controlnet":
        if not is_controlnet(names):
            raise NotOfCategory(
                "is not a ControlNet: it has no guide-image encoder (input_hint_block in the original layout, "
                "controlnet_cond_embedding in diffusers') beside the outputs a ControlNet adds to a UNet "
                f"(zero_convs, controlnet_down_blocks); its tensors are named like {shown(min(names, default=''), 80)}")
        # Its first convolution reads the latents alone (an inpainting UNet's extra channels are not its).
        first = next((list(shape) for name, shape in shapes.items()
                      if name == "conv_in.weight" or name.endswith("input_blocks.0.0.weight")), None)
        channels = int(first[1]) if first is not None and len(first) == 4 else None
        if channels is not None and channels != _CONTROLNET_LATENT_CHANNELS:
            raise RegistryError(f"is a ControlNet that reads {channels}-channel latents, where the ControlNets of SD "
                                f"1.x, 2.x and XL read {_CONTROLNET_LATENT_CHANNELS}")
        width = _width_of(shapes, ("attn2.to_k.weight",))
        if width is not None and width in _TEXT_WIDTHS:
            return _TEXT_WIDTHS[width]
        raise RegistryError("is a ControlNet of no architecture this server tells apart (SD 1.x, 2.x, XL)")
    raise ValueError(f"no architecture detection for category {category!r}")


# The vectors' widths of the text encoders an embedding is for (CLIP ViT-L, OpenCLIP ViT-H, the tiny model's).
_EMBEDDING_WIDTHS = (768, 1024, 32)
_SDXL_EMBEDDING_WIDTHS = {"clip_l": 768, "clip_g": 1280}


def _embedding_architecture(shapes: Mapping[str, Sequence[int]]) -> str:
    """The architecture of a textual-inversion embedding, in the layouts diffusers' ``load_textual_inversion``
    takes from a safetensors file: one tensor of vectors (AUTOMATIC1111's ``emb_params``, or diffusers' own
    ``{token: vectors}``), or SDXL's pair, ``clip_l`` and ``clip_g``, one per text encoder."""
    sizes = {name: list(shape) for name, shape in shapes.items()}
    if set(sizes) == set(_SDXL_EMBEDDING_WIDTHS):
        widths = {name: shape[-1] if len(shape) == 2 else None for name, shape in sizes.items()}
        if widths == _SDXL_EMBEDDING_WIDTHS and sizes["clip_l"][0] == sizes["clip_g"][0]:
            return "sdxl"
        raise RegistryError(
            f"is not an SDXL textual-inversion embedding: its clip_l and clip_g vectors are {sizes['clip_l']} "
            f"and {sizes['clip_g']}, where SDXL's text encoders take as many vectors of 768 and 1280 values")
    if len(sizes) == 1:
        ((name, shape),) = sizes.items()
        if len(shape) in (1, 2) and shape[-1] in _EMBEDDING_WIDTHS:
            return _TEXT_WIDTHS[shape[-1]]
        raise RegistryError(
            f"is not a textual-inversion embedding of SD 1.x or 2.x: its tensor {shown(name, 80)} is {shape}, where "
            "an embedding holds vectors of 768 (SD 1.x) or 1024 (SD 2.x) values")
    raise NotOfCategory(
        f"is not a textual-inversion embedding: it holds {len(sizes)} tensors (named like "
        f"{shown(min(sizes, default=''), 80)}), where an embedding holds one, its vectors (emb_params, or diffusers' "
        "{token: vectors}), or for SDXL two, clip_l and clip_g")


_CONTROLNET_LATENT_CHANNELS = 4


def is_controlnet(names: Iterable[str]) -> bool:
    """Whether tensors ``names`` are a ControlNet's, in the original layout or diffusers': a guide-image encoder
    and the convolutions whose outputs it adds to a UNet."""
    listed = list(names)
    original = any("input_hint_block." in name for name in listed) and any("zero_convs." in name for name in listed)
    ours = (any(name.startswith("controlnet_cond_embedding.") for name in listed)
            and any(name.startswith("controlnet_down_blocks.") for name in listed))
    return original or ours


def _raw_entry(found: FoundFile, digest: str) -> dict[str, Any]:
    stem = found.path.name.rsplit(".", 1)[0]
    raw: dict[str, Any] = {
        "air": f"{SOURCE}:{slug(stem)}@{digest[:8]}", "name": stem, "aliases": [stem],
        "source": "single_file", "location": str(found.path),
        "tags": ["models-dir", found.path.parent.name],
    }
    if found.category == "upscaler":
        # spandrel tells the network from the file when it loads it.
        raw |= {"category": "upscaler", "architecture": "esrgan"}
    elif found.category == "checkpoint":
        raw["category"] = "checkpoint"
        if not found.path.name.lower().endswith((".safetensors", ".gguf")):
            raise RegistryError("is a pickled checkpoint, whose architecture cannot be read without running "
                                "code from it; convert it to .safetensors")
        raw["architecture"] = detect_architecture(tensor_shapes(found.path))
        # How its weights are stored (float8, a GGUF quantization), for modelSearch's tags.
        stored = weights_format(found.path)
        if stored is not None:
            raw["tags"].append(stored)
    else:
        raw["category"] = found.category
        raw["architecture"] = add_on_architecture(found.category, tensor_shapes(found.path), stem)
        if found.category == "embeddings":
            raw["token"] = stem
    return raw


def unavailable(path: Path, category: str, reason: str, digest: str = "") -> ModelEntry:
    """A catalog entry that lists a file which cannot be used, with why."""
    stem = path.name.rsplit(".", 1)[0] if "." in path.name else path.name
    version = digest[:8] or "unusable"
    return ModelEntry(
        air=f"{SOURCE}:{slug(stem)}@{version}", name=stem, version=version, architecture=UNKNOWN, category=category,
        aliases=(stem,), tags=("models-dir", "unavailable"), source="single_file", location=str(path),
        defaults=usual_defaults(UNKNOWN), token=stem if category == "embeddings" else "",
        problem=f"the file {path} {reason}")


def scan(models_dirs: Sequence[Path], hashes: HashCache,
         known: Mapping[tuple[Path, int, int], ModelEntry] | None = None) -> dict[tuple[Path, int, int], ModelEntry]:
    """A catalog entry for each file of ``models_dirs``, by (path, size, modification time). Files seen before
    unchanged (in ``known``) keep their entries, unread."""
    entries: dict[tuple[Path, int, int], ModelEntry] = {}
    folders = {Path(folder) for folder in models_dirs}
    for found in find_files(models_dirs):
        if isinstance(found, tuple):
            path, reason = found
            if path in folders:
                # A folder that is missing now may be mounted later: said in the log, looked at again next time.
                logger.warning("models folder %s %s", path, reason)
                continue
            entries[(path, -1, -1)] = unavailable(path, "checkpoint", reason)
            continue
        key = (found.path, found.size, found.mtime_ns)
        if known is not None and key in known:
            entries[key] = known[key]
            continue
        digest = ""
        try:
            digest = hashes.sha256(found)
            entries[key] = parse_entry(_raw_entry(found, digest), found.path.parent, None)
        except OSError as exc:
            entries[key] = unavailable(found.path, found.category,
                                       f"cannot be read ({exc.strerror or type(exc).__name__})", digest)
        except (RegistryError, CatalogError) as exc:
            reason = exc.problem if isinstance(exc, RegistryError) else str(exc)
            entries[key] = unavailable(found.path, found.category, reason, digest)
        if entries[key].problem:
            logger.warning("models folder: %s", entries[key].problem)
    hashes.save(path for path, _, _ in entries)
    return entries


class ModelsFolders:
    """The models of ``--models-dir`` folders, scanned at start and again every ``RESCAN_SECONDS``."""

    def __init__(self, models_dirs: Sequence[Path], data_dir: Path) -> None:
        self.models_dirs = [Path(folder) for folder in models_dirs]
        self._hashes = HashCache(Path(data_dir) / HASHES_FILE)
        self._entries: dict[tuple[Path, int, int], ModelEntry] = {}

    @property
    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def rescan(self) -> tuple[list[ModelEntry], list[str]]:
        """Look at the folders again (blocking: file I/O, hashing): the entries new or changed since the last
        look, and the AIR ids no file has any more."""
        before = self._entries
        after = scan(self.models_dirs, self._hashes, before)
        self._entries = after
        added = [entry for key, entry in after.items() if key not in before]
        remaining = {entry.air for entry in after.values()}
        removed = sorted({entry.air for entry in before.values()} - remaining)
        return added, removed
