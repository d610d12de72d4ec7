"""Where a catalog model's weights are: the embedded model's build folder, the Hugging Face cache,
an operator's folder or single file. Looking costs a few file system calls and no torch.

``locate_weights`` answers the path, or ``WeightsMissing`` saying what is missing and the command
that fetches it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from imagewire.air_registry.air import parse_air
from imagewire.air_registry.catalog import ModelEntry, hub_file
from imagewire.air_registry.errors import WeightsMissing
from imagewire.air_registry.ip_adapters import CATEGORY as IP_ADAPTER
from imagewire.air_registry.ip_adapters import hub_encoder_files
from imagewire.air_registry.model_files import (
    ADD_ON_FILE_LAYOUT,
    ADD_ON_FILE_NAMES,
    HUB_PATTERNS,
    LAYOUT_MARKERS,
    MODEL_INDEX,
)

log = logging.getLogger(__name__)


def quiet_hub_progress_bars() -> None:
    """Turn off the hub library's own progress bars, before a download of the server's.

    It draws a tqdm bar per download on stderr, which in a server's log is noise (one more line per redraw where
    stderr is no terminal); the server logs a download's progress itself. The switch is the library's (its
    bars only, not those of diffusers or transformers) and holds for the whole process, so it stays off once
    set: turning it back on after one download would bring the bars back for another still running on a
    thread beside it. An operator who wants them sets HF_HUB_DISABLE_PROGRESS_BARS=0, which the library puts
    first, and then they are left on."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

    # All of its bars, not a named group of them: the bar over a snapshot's files is created with no name.
    if constants.HF_HUB_DISABLE_PROGRESS_BARS is False or are_progress_bars_disabled():
        return
    disable_progress_bars()


def weights_file(path: Path, category: str) -> Path | None:
    """A LoRA's or an embedding's weights file at ``path`` (the file itself, or in a folder: diffusers' own name
    for it, or else the folder's only ``.safetensors`` file); None: none there."""
    if path.is_file():
        return path
    named = path / ADD_ON_FILE_NAMES.get(category, "")
    if named.is_file():
        return named
    candidates = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return candidates[0] if len(candidates) == 1 else None


def local_model_dir(entry: ModelEntry, data_dir: Path) -> Path:
    """Where the server keeps a model it builds itself: ``data_dir/models/<source>-<id>-<version>``."""
    air = parse_air(entry.air)
    return Path(data_dir) / "models" / f"{air.source}-{air.id}-{air.version}"


def hub_download_command(repo: str, layout: str = "diffusers", filename: str | None = None) -> str:
    if filename is not None:
        return f"hf download {repo} {filename}"
    included, excluded = HUB_PATTERNS[layout]
    include = " ".join(f"--include '{pattern}'" for pattern in included)
    exclude = " ".join(f"--exclude '{pattern}'" for pattern in excluded)
    return " ".join(part for part in (f"hf download {repo}", include, exclude) if part)


def _missing(entry: ModelEntry, what: str) -> WeightsMissing:
    return WeightsMissing(f"the weights of {entry.label} are not on this server: {what}")


def _hub_files(entry: ModelEntry) -> tuple[str, str | None, list[str], list[str], str]:
    """What of a hub entry's repo it needs: ``(repo, its one file or None, include patterns, exclude patterns,
    the command that downloads them)``."""
    layout = entry.layout
    # A weights_file model names one file of its repo: "owner/name/file.pth".
    repo, filename = hub_file(entry.location) if layout == "weights_file" else (entry.location, None)
    # An IP-Adapter's file is read with the image encoder of its repo: both are needed, both are fetched.
    companions = hub_encoder_files(entry) if entry.category == IP_ADAPTER else []
    command = hub_download_command(repo, layout, " ".join([filename, *companions]) if filename else None)
    patterns = [filename, *companions] if filename is not None else list(HUB_PATTERNS[layout][0])
    excluded = [] if filename is not None else list(HUB_PATTERNS[layout][1])
    return repo, filename, patterns, excluded, command


def hub_download_size(entry: ModelEntry) -> int:
    """How many bytes downloading the hub entry's files would fetch (those not in the cache yet); asks the hub."""
    from huggingface_hub import snapshot_download

    repo, _, patterns, excluded, command = _hub_files(entry)
    quiet_hub_progress_bars()
    try:
        plan = snapshot_download(repo, allow_patterns=patterns, ignore_patterns=excluded, dry_run=True)
    except Exception as exc:
        raise _missing(entry, f"Hugging Face repo '{repo}' could not be listed ({type(exc).__name__}); check the "
                              f"server's network access, or download it with `{command}`") from exc
    return sum(item.file_size or 0 for item in plan if not isinstance(item, str) and item.will_download)


def hub_bytes_on_disk(entry: ModelEntry) -> int:
    """The bytes of the hub entry's repo in the cache, the files being downloaded included (their
    ``.incomplete`` parts): how far a download has got, against what it was before."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = _hub_files(entry)[0]
    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "blobs"
    total = 0
    for path in blobs.glob("*") if blobs.is_dir() else ():
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # an .incomplete part renamed meanwhile: its bytes count under the new name
            pass
    return total


def download_hub_weights(entry: ModelEntry) -> Path:
    """Fetch the hub entry's files into the Hugging Face cache, and answer where its weights are.

    Each file lands whole (the hub library writes an ``.incomplete`` part and renames it). The file that marks
    a layout as present (``model_index.json``) comes last, in a second pass: an interrupted download leaves a
    model that still counts as missing, never one that looks complete and is not; the next download resumes.
    """
    from huggingface_hub import snapshot_download

    repo, filename, patterns, excluded, command = _hub_files(entry)
    marker = LAYOUT_MARKERS.get(entry.layout) if filename is None else None
    quiet_hub_progress_bars()
    try:
        if marker is not None:
            snapshot_download(repo, allow_patterns=patterns, ignore_patterns=[*excluded, marker])
        snapshot_download(repo, allow_patterns=patterns, ignore_patterns=excluded)
    except Exception as exc:
        raise _missing(entry, f"Hugging Face repo '{repo}' could not be downloaded ({type(exc).__name__}); check "
                              f"the server's network access, or download it with `{command}`") from exc
    return _locate_hub_weights(entry, allow_downloads=False)


def _locate_hub_weights(entry: ModelEntry, *, allow_downloads: bool) -> Path:
    # Imported here: huggingface_hub is slow to import and only the model worker needs it.
    from huggingface_hub import snapshot_download

    layout = entry.layout
    repo, filename, patterns, excluded, command = _hub_files(entry)
    try:
        snapshot = Path(snapshot_download(repo, local_files_only=True))
        for name in patterns if filename is not None else ():
            if not (snapshot / name).is_file():
                raise FileNotFoundError(name)
    except Exception as exc:
        what = f"'{filename}' of Hugging Face repo '{repo}'" if filename else f"Hugging Face repo '{repo}'"
        if not allow_downloads:
            raise _missing(
                entry,
                f"{what} is not in the local cache; download it with `{command}` or start the server with "
                "--allow-downloads",
            ) from exc
        quiet_hub_progress_bars()
        # The hub library's bars are off: these lines say in the server's log why a first request waits.
        log.info("downloading %s from Hugging Face repo '%s' on first use", entry.air, repo)
        started = time.monotonic()
        try:
            snapshot = Path(snapshot_download(repo, allow_patterns=patterns, ignore_patterns=excluded))
            log.info("downloaded %s in %.1f s", entry.air, time.monotonic() - started)
        except Exception as download_exc:
            raise _missing(
                entry,
                f"{what} could not be downloaded ({type(download_exc).__name__}); check "
                f"the server's network access, or download it with `{command}`",
            ) from download_exc
    if filename is not None:
        return snapshot / filename
    if layout == ADD_ON_FILE_LAYOUT:
        found = weights_file(snapshot, entry.category)
        if found is None:
            raise _missing(entry, f"the local copy of Hugging Face repo '{repo}' has no single .safetensors "
                                  f"weights file (nor {ADD_ON_FILE_NAMES[entry.category]}); download it with "
                                  f"`{command}`")
        return found
    marker = LAYOUT_MARKERS[layout]
    if not (snapshot / marker).is_file():
        raise _missing(
            entry,
            f"the local copy of Hugging Face repo '{repo}' has no {marker}; download the {layout} "
            f"files with `{command}`",
        )
    return snapshot


def locate_weights(entry: ModelEntry, *, data_dir: Path, allow_downloads: bool) -> Path:
    """The local path of the entry's weights, or ``WeightsMissing`` saying what is missing and how to add it.

    For an embedded model this is where it is (or will be) built; building is ``tiny.ensure_embedded``.
    A LoRA or an embedding from a folder or the hub is its weights file (see ``weights_file``).
    """
    if entry.problem:
        raise WeightsMissing(entry.problem)
    if entry.source == "embedded":
        return local_model_dir(entry, data_dir)
    if entry.source == "hub":
        return _locate_hub_weights(entry, allow_downloads=allow_downloads)
    location = Path(entry.location)
    if entry.source == "folder":
        layout = entry.layout
        if not location.is_dir():
            raise _missing(
                entry,
                f"the folder '{entry.location}' named in the catalog does not exist; "
                f"save the model there in {layout} format or change the catalog entry",
            )
        if layout == ADD_ON_FILE_LAYOUT:
            found = weights_file(location, entry.category)
            if found is None:
                raise _missing(
                    entry,
                    f"the folder '{entry.location}' named in the catalog holds no "
                    f"{ADD_ON_FILE_NAMES[entry.category]} and not exactly one .safetensors file",
                )
            return found
        marker = LAYOUT_MARKERS.get(layout, MODEL_INDEX)
        if layout != "weights_file" and not (location / marker).is_file():
            raise _missing(
                entry,
                f"the folder '{entry.location}' named in the catalog has no {marker}; "
                f"it must hold a model saved in {layout} format",
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
    if entry.problem:
        return False, entry.problem
    if entry.source == "embedded":
        return True, ""
    try:
        locate_weights(entry, data_dir=data_dir, allow_downloads=False)
    except WeightsMissing as exc:
        if allow_downloads and entry.source == "hub":
            return True, f"downloaded from Hugging Face repo '{entry.location}' on first use"
        return False, exc.problem
    return True, ""
