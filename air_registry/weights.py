"""Where a catalog model's weights are: the embedded model's build folder, the Hugging Face cache,
an operator's folder or single file. Looking costs a few file system calls and no torch.

``locate_weights`` answers the path, or ``WeightsMissing`` saying what is missing and the command
that fetches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from imagewire.air_registry.air import parse_air
from imagewire.air_registry.catalog import ModelEntry
from imagewire.air_registry.errors import WeightsMissing
from imagewire.air_registry.model_files import (
    COMPONENT_CONFIG,
    EMBEDDING_WEIGHTS,
    HUB_EXCLUDE,
    HUB_INCLUDE,
    LORA_WEIGHTS,
    MODEL_INDEX,
)

# How a folder or hub repo of each category of model is recognised: the file it must hold. A checkpoint is a
# pipeline folder, a VAE one diffusers model; a LoRA or an embedding is one weights file, which the lookup
# answers directly (diffusers' own name for it, or else the folder's only ``.safetensors`` file).
FOLDER_FILES: Mapping[str, str] = {"checkpoint": MODEL_INDEX, "vae": COMPONENT_CONFIG,
                                   "lora": LORA_WEIGHTS, "embeddings": EMBEDDING_WEIGHTS}
WEIGHTS_FILE_CATEGORIES = frozenset({"lora", "embeddings"})
# What a hub download of each category fetches (checkpoints: HUB_INCLUDE, the diffusers components only).
_HUB_FILES: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vae": ((COMPONENT_CONFIG, "*.safetensors"), ("*.fp16.*",)),
    "lora": (("*.safetensors",), ()),
    "embeddings": (("*.safetensors",), ()),
}


def _hub_patterns(category: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return _HUB_FILES.get(category, (HUB_INCLUDE, HUB_EXCLUDE))


def _folder_file(category: str) -> str:
    return FOLDER_FILES.get(category, MODEL_INDEX)


def weights_file(path: Path, category: str) -> Path | None:
    """A LoRA's or an embedding's weights file at ``path`` (the file itself, or in a folder); None: none there."""
    if path.is_file():
        return path
    named = path / _folder_file(category)
    if named.is_file():
        return named
    candidates = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return candidates[0] if len(candidates) == 1 else None


def local_model_dir(entry: ModelEntry, data_dir: Path) -> Path:
    """Where the server keeps a model it builds itself: ``data_dir/models/<source>-<id>-<version>``."""
    air = parse_air(entry.air)
    return Path(data_dir) / "models" / f"{air.source}-{air.id}-{air.version}"


def hub_download_command(repo: str, category: str = "checkpoint") -> str:
    included, excluded = _hub_patterns(category)
    include = " ".join(f"--include '{pattern}'" for pattern in included)
    exclude = " ".join(f"--exclude '{pattern}'" for pattern in excluded)
    return " ".join(part for part in (f"hf download {repo}", include, exclude) if part)


def _missing(entry: ModelEntry, what: str) -> WeightsMissing:
    return WeightsMissing(f"the weights of {entry.label} are not on this server: {what}")


def _locate_hub_weights(entry: ModelEntry, *, allow_downloads: bool) -> Path:
    # Imported here: huggingface_hub is slow to import and only the model worker needs it.
    from huggingface_hub import snapshot_download

    repo, category = entry.location, entry.category
    command = hub_download_command(repo, category)
    try:
        snapshot = Path(snapshot_download(repo, local_files_only=True))
    except Exception as exc:
        if not allow_downloads:
            raise _missing(
                entry,
                f"Hugging Face repo '{repo}' is not in the local cache; download it with "
                f"`{command}` or start the server with --allow-downloads",
            ) from exc
        included, excluded = _hub_patterns(category)
        try:
            snapshot = Path(
                snapshot_download(repo, allow_patterns=list(included), ignore_patterns=list(excluded) or None)
            )
        except Exception as download_exc:
            raise _missing(
                entry,
                f"Hugging Face repo '{repo}' could not be downloaded ({type(download_exc).__name__}); check "
                f"the server's network access, or download it with `{command}`",
            ) from download_exc
    if category in WEIGHTS_FILE_CATEGORIES:
        found = weights_file(snapshot, category)
        if found is None:
            raise _missing(entry, f"the local copy of Hugging Face repo '{repo}' has no single .safetensors "
                                  f"weights file (nor {_folder_file(category)}); download it with `{command}`")
        return found
    if not (snapshot / _folder_file(category)).is_file():
        raise _missing(
            entry,
            f"the local copy of Hugging Face repo '{repo}' has no {_folder_file(category)}; download the "
            f"diffusers files with `{command}`",
        )
    return snapshot


def locate_weights(entry: ModelEntry, *, data_dir: Path, allow_downloads: bool) -> Path:
    """The local path of the entry's weights, or ``WeightsMissing`` saying what is missing and how to add it.

    For an embedded model this is where it is (or will be) built; building is ``tiny.ensure_embedded``.
    A LoRA or an embedding from a folder or the hub is its weights file (see ``weights_file``).
    """
    if entry.source == "embedded":
        return local_model_dir(entry, data_dir)
    if entry.source == "hub":
        return _locate_hub_weights(entry, allow_downloads=allow_downloads)
    location = Path(entry.location)
    if entry.source == "folder":
        if not location.is_dir():
            raise _missing(
                entry,
                f"the folder '{entry.location}' named in the catalog does not exist; "
                "save the model there in diffusers format or change the catalog entry",
            )
        if entry.category in WEIGHTS_FILE_CATEGORIES:
            found = weights_file(location, entry.category)
            if found is None:
                raise _missing(
                    entry,
                    f"the folder '{entry.location}' named in the catalog holds no "
                    f"{_folder_file(entry.category)} and not exactly one .safetensors file",
                )
            return found
        if not (location / _folder_file(entry.category)).is_file():
            raise _missing(
                entry,
                f"the folder '{entry.location}' named in the catalog has no {_folder_file(entry.category)}; "
                "it must hold a model saved in diffusers format",
            )
        return location
    if entry.source == "single_file":
        if not location.is_file():
            raise _missing(
                entry,
                f"the file '{entry.location}' named in the catalog does not exist; "
                "put the checkpoint there or change the catalog entry",
            )
        return location
    raise ValueError(f"unknown model source {entry.source!r}")


def availability(entry: ModelEntry, *, data_dir: Path, allow_downloads: bool = False) -> tuple[bool, str]:
    """``(True, "")`` when the entry can be loaded, else ``(False, what is missing and how to add it)``.

    Cheap: it looks at the disk and the Hugging Face cache, never at the network or torch. With
    ``allow_downloads`` a hub model missing from the cache counts as available: it is fetched on first use.
    """
    if entry.source == "embedded":
        return True, ""
    try:
        locate_weights(entry, data_dir=data_dir, allow_downloads=False)
    except WeightsMissing as exc:
        if allow_downloads and entry.source == "hub":
            return True, f"downloaded from Hugging Face repo '{entry.location}' on first use"
        return False, exc.problem
    return True, ""
