"""Where a catalog model's weights are: the embedded model's build folder, the Hugging Face cache,
an operator's folder or single file. Looking costs a few file system calls and no torch.

``locate_weights`` answers the path, or ``WeightsMissing`` saying what is missing and the command
that fetches it.
"""

from __future__ import annotations

from pathlib import Path

from imagewire.air_registry.air import parse_air
from imagewire.air_registry.catalog import ModelEntry
from imagewire.air_registry.errors import WeightsMissing
from imagewire.air_registry.model_files import (
    COMPONENT_CATEGORIES,
    COMPONENT_HUB_INCLUDE,
    HUB_EXCLUDE,
    HUB_INCLUDE,
    saved_marker,
)


def local_model_dir(entry: ModelEntry, data_dir: Path) -> Path:
    """Where the server keeps a model it builds itself: ``data_dir/models/<source>-<id>-<version>``."""
    air = parse_air(entry.air)
    return Path(data_dir) / "models" / f"{air.source}-{air.id}-{air.version}"


def hub_patterns(category: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a hub download of a model of ``category`` fetches, and leaves out."""
    if category in COMPONENT_CATEGORIES:
        return COMPONENT_HUB_INCLUDE, ()
    return HUB_INCLUDE, HUB_EXCLUDE


def hub_download_command(repo: str, category: str = "checkpoint") -> str:
    included, excluded = hub_patterns(category)
    include = " ".join(f"--include '{pattern}'" for pattern in included)
    exclude = " ".join(f"--exclude '{pattern}'" for pattern in excluded)
    return " ".join(part for part in (f"hf download {repo}", include, exclude) if part)


def _missing(entry: ModelEntry, what: str) -> WeightsMissing:
    return WeightsMissing(f"the weights of {entry.label} are not on this server: {what}")


def _locate_hub_weights(entry: ModelEntry, *, allow_downloads: bool) -> Path:
    # Imported here: huggingface_hub is slow to import and only the model worker needs it.
    from huggingface_hub import snapshot_download

    repo, marker = entry.location, saved_marker(entry.category)
    included, excluded = hub_patterns(entry.category)
    command = hub_download_command(repo, entry.category)
    try:
        snapshot = Path(snapshot_download(repo, local_files_only=True))
    except Exception as exc:
        if not allow_downloads:
            raise _missing(
                entry,
                f"Hugging Face repo '{repo}' is not in the local cache; download it with "
                f"`{command}` or start the server with --allow-downloads",
            ) from exc
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
    if not (snapshot / marker).is_file():
        raise _missing(
            entry,
            f"the local copy of Hugging Face repo '{repo}' has no {marker}; download the diffusers "
            f"files with `{command}`",
        )
    return snapshot


def locate_weights(entry: ModelEntry, *, data_dir: Path, allow_downloads: bool) -> Path:
    """The local path of the entry's weights, or ``WeightsMissing`` saying what is missing and how to add it.

    For an embedded model this is where it is (or will be) built; building is ``tiny.ensure_embedded``.
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
        if not (location / saved_marker(entry.category)).is_file():
            raise _missing(
                entry,
                f"the folder '{entry.location}' named in the catalog has no {saved_marker(entry.category)}; "
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
