"""The model catalog: which AIR ids this server knows, where their weights are, and their defaults.

The catalog is data. ``catalog.json`` next to this module ships the built-in models; operators add
or replace models with their own files in the same format (see :meth:`Catalog.load`). A file entry:

    {"air": "mysite:portrait@2", "name": "Portrait v2", "aliases": ["portrait"],
     "architecture": "sd15", "category": "checkpoint", "tags": ["portrait"],
     "source": "folder", "location": "models/portrait-v2",
     "defaults": {"width": 512, "height": 768, "steps": 25, "scheduler": "DPM++ 2M Karras",
                  "CFGScale": 6.5, "strength": 0.7}}

``source`` says how ``location`` is read: ``embedded`` (built by this server, no location),
``hub`` (a Hugging Face repo id, read from the local Hugging Face cache), ``folder`` (a model saved
in diffusers format) or ``single_file`` (a ``.safetensors``/``.ckpt`` checkpoint). Missing
``defaults`` keys take the architecture's usual values.

Nothing here imports torch or diffusers: the protocol layer resolves models before any GPU work.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from air_registry.air import parse_air
from air_registry.schedulers import DEFAULT_NAME, resolve_scheduler
from server.errors import InvalidParameter, ModelNotFound, TaskError, describe_value
from tasks.schema import ModelInfo

SHIPPED_CATALOG = Path(__file__).with_name("catalog.json")

ARCHITECTURES: tuple[str, ...] = ("tiny", "sd15", "sd21", "sdxl", "sdxl-refiner")
SOURCES: tuple[str, ...] = ("embedded", "hub", "folder", "single_file")
SINGLE_FILE_SUFFIXES: tuple[str, ...] = (".safetensors", ".ckpt")
MODEL_INDEX = "model_index.json"

# What a hub download fetches: the diffusers-format components only. Model repos also carry
# full-size single-file checkpoints, fp16 and non-EMA copies and a safety checker, many times the
# size of what the server loads.
HUB_INCLUDE: tuple[str, ...] = ("model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors")
HUB_EXCLUDE: tuple[str, ...] = ("*.fp16.*", "*non_ema*", "safety_checker/*")

# How many known models a "not found" message names; the catalog can be long.
_MODELS_NAMED_IN_ERRORS = 10
_ALLOWED_VALUES_LIMIT = 100


def _usual_defaults(size: int, steps: int, strength: float = 0.8) -> Mapping[str, Any]:
    return {
        "width": size,
        "height": size,
        "steps": steps,
        "scheduler": DEFAULT_NAME,
        "CFGScale": 7.0,
        "strength": strength,
    }


# What a catalog entry gets for the ``defaults`` it leaves out: the usual values for its architecture.
_DEFAULTS_BY_ARCHITECTURE: Mapping[str, Mapping[str, Any]] = {
    "tiny": _usual_defaults(256, 8),
    "sd15": _usual_defaults(512, 20),
    "sd21": _usual_defaults(768, 20),
    "sdxl": _usual_defaults(1024, 30),
    "sdxl-refiner": _usual_defaults(1024, 30, strength=0.3),
}

_ENTRY_KEYS = frozenset(
    {"air", "name", "aliases", "architecture", "category", "tags", "source", "location", "defaults"}
)
_DEFAULTS_KEYS = frozenset({"width", "height", "steps", "scheduler", "CFGScale", "strength"})
_HUB_REPO_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


@dataclass(frozen=True)
class ModelDefaults:
    width: int
    height: int
    steps: int
    scheduler: str
    cfg_scale: float
    strength: float


@dataclass(frozen=True)
class ModelEntry:
    air: str
    name: str
    version: str
    architecture: str
    category: str
    aliases: tuple[str, ...]
    tags: tuple[str, ...]
    source: str
    location: str
    defaults: ModelDefaults

    @property
    def label(self) -> str:
        """How messages name the model: ``Stable Diffusion 1.5 (imagewire:sd15@1)``."""
        return f"{self.name} ({self.air})"


class CatalogError(ValueError):
    """A catalog file is malformed: an operator's mistake, reported at start-up."""


# ---------------------------------------------------------------- reading catalog files


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise CatalogError(problem)


def _string(raw: Mapping[str, Any], key: str, *, default: str | None = None) -> str:
    value = raw.get(key, default)
    _require(value is not None, f"'{key}' is required")
    _require(isinstance(value, str), f"'{key}' must be a string, not {describe_value(value)}")
    return str(value).strip()


def _string_list(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    _require(
        isinstance(value, list) and all(isinstance(item, str) and item.strip() for item in value),
        f"'{key}' must be a list of non-empty strings, not {describe_value(value)}",
    )
    return tuple(item.strip() for item in value)


def _number(raw: Mapping[str, Any], key: str, *, low: float, high: float, integer: bool) -> Any:
    value = raw[key]
    kind = "an integer" if integer else "a number"
    valid_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    _require(
        valid_type and not isinstance(value, bool),
        f"defaults.{key} must be {kind}, not {describe_value(value)}",
    )
    _require(low <= value <= high, f"defaults.{key} must be between {low:g} and {high:g}, not {value}")
    return value


def _parse_defaults(raw: Any, architecture: str) -> ModelDefaults:
    _require(raw is None or isinstance(raw, dict), f"'defaults' must be an object, not {describe_value(raw)}")
    given = dict(raw or {})
    unknown = sorted(set(given) - _DEFAULTS_KEYS)
    known = ", ".join(sorted(_DEFAULTS_KEYS))
    _require(not unknown, f"unknown keys in 'defaults': {', '.join(unknown)} (known: {known})")
    merged = {**_DEFAULTS_BY_ARCHITECTURE[architecture], **given}
    for side in ("width", "height"):
        _number(merged, side, low=128, high=2048, integer=True)
        _require(merged[side] % 64 == 0, f"defaults.{side} must be divisible by 64, not {merged[side]}")
    scheduler = merged["scheduler"]
    _require(
        isinstance(scheduler, str), f"defaults.scheduler must be a string, not {describe_value(scheduler)}"
    )
    try:
        spec = resolve_scheduler(scheduler)
    except InvalidParameter as exc:
        raise CatalogError(
            f"defaults.scheduler {describe_value(scheduler)} is not a known scheduler name"
        ) from exc
    strength = _number(merged, "strength", low=0, high=1, integer=False)
    _require(strength > 0, "defaults.strength must be above 0")
    return ModelDefaults(
        width=merged["width"],
        height=merged["height"],
        steps=_number(merged, "steps", low=1, high=100, integer=True),
        scheduler=DEFAULT_NAME if spec is None else spec.name,
        cfg_scale=float(_number(merged, "CFGScale", low=0, high=50, integer=False)),
        strength=float(strength),
    )


def _parse_location(raw: Mapping[str, Any], source: str, base_dir: Path) -> str:
    location = _string(raw, "location", default="")
    if source == "embedded":
        _require(not location, "an embedded model has no 'location'")
        return ""
    _require(bool(location), f"a '{source}' model needs a 'location'")
    if source == "hub":
        _require(
            _HUB_REPO_PATTERN.fullmatch(location) is not None,
            "'location' of a hub model must be a Hugging Face repo id like 'owner/name', "
            f"not {describe_value(location)}",
        )
        return location
    if source == "single_file":
        _require(
            location.lower().endswith(SINGLE_FILE_SUFFIXES),
            f"'location' of a single_file model must end in {' or '.join(SINGLE_FILE_SUFFIXES)}",
        )
    # Relative paths are relative to the catalog file, so a catalog and its models can move together.
    return str((base_dir / Path(location).expanduser()).resolve())


def _parse_entry(raw: Any, base_dir: Path) -> ModelEntry:
    _require(isinstance(raw, dict), f"an entry must be an object, not {describe_value(raw)}")
    unknown = sorted(set(raw) - _ENTRY_KEYS)
    _require(not unknown, f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(_ENTRY_KEYS))})")
    try:
        air = parse_air(_string(raw, "air"))
    except InvalidParameter as exc:
        raise CatalogError(
            f"'air' must have the form source:id@version, not {describe_value(raw['air'])}"
        ) from exc
    architecture = _string(raw, "architecture")
    _require(
        architecture in ARCHITECTURES,
        f"'architecture' must be one of {', '.join(ARCHITECTURES)}, not {architecture!r}",
    )
    source = _string(raw, "source")
    _require(source in SOURCES, f"'source' must be one of {', '.join(SOURCES)}, not {source!r}")
    # The server can build exactly one model itself; everything else comes from weights on disk.
    _require(
        source != "embedded" or architecture == "tiny",
        "only the 'tiny' architecture can be 'embedded'; "
        "other models need weights (hub, folder or single_file)",
    )
    _require(
        source != "single_file" or architecture != "tiny",
        "the 'tiny' architecture cannot be loaded from a single file",
    )
    name = _string(raw, "name")
    _require(bool(name), "'name' must not be empty")
    return ModelEntry(
        air=str(air),
        name=name,
        version=air.version,
        architecture=architecture,
        category=_string(raw, "category", default="checkpoint"),
        aliases=_string_list(raw, "aliases"),
        tags=_string_list(raw, "tags"),
        source=source,
        location=_parse_location(raw, source, base_dir),
        defaults=_parse_defaults(raw.get("defaults"), architecture),
    )


def _read_catalog_file(path: Path) -> list[tuple[ModelEntry, str]]:
    """Entries of one file, each with where it came from (for messages about conflicts)."""
    try:
        raw_entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CatalogError(f"catalog file {path} cannot be read: {reason}") from exc
    except ValueError as exc:
        raise CatalogError(f"catalog file {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw_entries, list):
        raise CatalogError(f"catalog file {path} must hold a JSON list of model entries")
    entries = []
    for index, raw in enumerate(raw_entries):
        origin = f"catalog file {path}, entry {index}"
        if isinstance(raw, dict) and isinstance(raw.get("air"), str):
            origin += f" ({raw['air']})"
        try:
            entries.append((_parse_entry(raw, path.parent), origin))
        except CatalogError as exc:
            raise CatalogError(f"{origin}: {exc}") from exc
    return entries


# ---------------------------------------------------------------- the catalog


class Catalog:
    """The models this server knows, looked up by AIR id or alias."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self.entries: tuple[ModelEntry, ...] = tuple(entries)
        self._by_air = {entry.air: entry for entry in self.entries}
        self._by_alias: dict[str, ModelEntry] = {}
        for entry in self.entries:
            for alias in entry.aliases:
                self._by_alias[alias.casefold()] = entry

    @classmethod
    def load(cls, extra_files: Sequence[Path] = ()) -> Catalog:
        """The shipped catalog, then each of ``extra_files`` in order.

        An entry with the AIR of an earlier one replaces it (in its place); an alias claimed by a
        later entry moves to it. A malformed file raises :class:`CatalogError` (a ``ValueError``)
        naming the file and the entry.
        """
        merged: dict[str, tuple[ModelEntry, str]] = {}
        for path in (SHIPPED_CATALOG, *(Path(extra) for extra in extra_files)):
            for entry, origin in _read_catalog_file(path):
                merged[entry.air] = (entry, origin)
        for entry, origin in merged.values():
            for alias in entry.aliases:
                # AIR ids are looked up before aliases, so such an alias could never be reached.
                shadowing = merged.get(alias) or merged.get(_lowered_source(alias))
                if shadowing is not None and shadowing[0] is not entry:
                    raise CatalogError(
                        f"{origin}: alias {alias!r} is the AIR id of another model ({shadowing[1]})"
                    )
        return cls(entry for entry, _ in merged.values())

    def get(self, air: str) -> ModelEntry | None:
        return self._by_air.get(air)

    def resolve(self, name: str) -> ModelEntry:
        """The entry a client's ``model`` value names: an AIR id or one of the catalog's aliases."""
        text = name.strip() if isinstance(name, str) else ""
        try:
            air: str | None = str(parse_air(text))
        except InvalidParameter:
            air = None
        if air is not None and air in self._by_air:
            return self._by_air[air]
        entry = self._by_alias.get(text.casefold())
        if entry is not None:
            return entry
        if air is None:
            raise InvalidParameter(
                "model must be an AIR id of the form source:id@version, like 'runware:101@1', or an alias "
                f"of a model of this server ({self._describe_known()}); received {describe_value(name)}",
                parameter="model",
                type="string",
                allowed_values=self._allowed_values(),
            )
        raise ModelNotFound(
            f"model {describe_value(name)} is not in this server's catalog; known models: "
            f"{self._describe_known()}",
            parameter="model",
            type="string",
            allowed_values=self._allowed_values(),
        )

    def search(
        self,
        *,
        text: str | None = None,
        category: str | None = None,
        architecture: str | None = None,
        tags: list[str] | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> tuple[int, list[ModelEntry]]:
        """``(total matches, one page of them)``, in catalog order.

        ``text`` matches when each of its words is part of the AIR, name, an alias or a tag;
        ``category`` and ``architecture`` must be equal; every one of ``tags`` must be present.
        All comparisons ignore case.
        """
        words = text.casefold().split() if text else []
        wanted_tags = {tag.casefold() for tag in tags or ()}
        matches = [
            entry
            for entry in self.entries
            if all(word in _searchable_text(entry) for word in words)
            and (category is None or entry.category.casefold() == category.casefold())
            and (architecture is None or entry.architecture.casefold() == architecture.casefold())
            and wanted_tags <= {tag.casefold() for tag in entry.tags}
        ]
        start = max(offset, 0)
        return len(matches), matches[start : start + max(limit, 0)]

    def _describe_known(self) -> str:
        described = [
            f"{entry.air} ({', '.join(entry.aliases)})" if entry.aliases else entry.air
            for entry in self.entries[:_MODELS_NAMED_IN_ERRORS]
        ]
        hidden = len(self.entries) - len(described)
        if hidden > 0:
            described.append(f"and {hidden} more (see modelSearch)")
        return ", ".join(described) if described else "none"

    def _allowed_values(self) -> list[str]:
        airs = [entry.air for entry in self.entries]
        aliases = [alias for entry in self.entries for alias in entry.aliases]
        names = airs + aliases
        return names[:_ALLOWED_VALUES_LIMIT]


def _lowered_source(text: str) -> str:
    source, colon, rest = text.partition(":")
    return source.lower() + colon + rest


def _searchable_text(entry: ModelEntry) -> str:
    return "\n".join([entry.air, entry.name, *entry.aliases, *entry.tags]).casefold()


# ---------------------------------------------------------------- where the weights are


def local_model_dir(entry: ModelEntry, data_dir: Path) -> Path:
    """Where the server keeps a model it builds itself: ``data_dir/models/<source>-<id>-<version>``."""
    air = parse_air(entry.air)
    return Path(data_dir) / "models" / f"{air.source}-{air.id}-{air.version}"


def hub_download_command(repo: str) -> str:
    include = " ".join(f"--include '{pattern}'" for pattern in HUB_INCLUDE)
    exclude = " ".join(f"--exclude '{pattern}'" for pattern in HUB_EXCLUDE)
    return f"hf download {repo} {include} {exclude}"


def _missing(entry: ModelEntry, what: str) -> ModelNotFound:
    return ModelNotFound(
        f"the weights of {entry.label} are not on this server: {what}", parameter="model", type="string"
    )


def _locate_hub_weights(entry: ModelEntry, *, allow_downloads: bool) -> Path:
    # Imported here: huggingface_hub is slow to import and only the model worker needs it.
    from huggingface_hub import snapshot_download

    repo = entry.location
    try:
        snapshot = Path(snapshot_download(repo, local_files_only=True))
    except Exception as exc:
        if not allow_downloads:
            raise _missing(
                entry,
                f"Hugging Face repo '{repo}' is not in the local cache; download it with "
                f"`{hub_download_command(repo)}` or start the server with --allow-downloads",
            ) from exc
        try:
            snapshot = Path(
                snapshot_download(repo, allow_patterns=list(HUB_INCLUDE), ignore_patterns=list(HUB_EXCLUDE))
            )
        except Exception as download_exc:
            raise _missing(
                entry,
                f"Hugging Face repo '{repo}' could not be downloaded ({type(download_exc).__name__}); check "
                f"the server's network access, or download it with `{hub_download_command(repo)}`",
            ) from download_exc
    if not (snapshot / MODEL_INDEX).is_file():
        raise _missing(
            entry,
            f"the local copy of Hugging Face repo '{repo}' has no {MODEL_INDEX}; download the diffusers "
            f"files with `{hub_download_command(repo)}`",
        )
    return snapshot


def locate_weights(entry: ModelEntry, *, data_dir: Path, allow_downloads: bool) -> Path:
    """The local path of the entry's weights, or ``ModelNotFound`` saying what is missing and how to add it.

    For the embedded model this is where it is (or will be) built; building is ``tiny.ensure_tiny_model``.
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
        if not (location / MODEL_INDEX).is_file():
            raise _missing(
                entry,
                f"the folder '{entry.location}' named in the catalog has no {MODEL_INDEX}; "
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
    except TaskError as exc:
        if allow_downloads and entry.source == "hub":
            return True, f"downloaded from Hugging Face repo '{entry.location}' on first use"
        return False, exc.message
    return True, ""


def model_info(entry: ModelEntry, *, available: bool, comment: str) -> ModelInfo:
    """The entry as a ``modelSearch`` result."""
    return ModelInfo(
        air=entry.air,
        name=entry.name,
        version=entry.version,
        category=entry.category,
        architecture=entry.architecture,
        tags=list(entry.tags),
        private=False,
        defaultWidth=entry.defaults.width,
        defaultHeight=entry.defaults.height,
        defaultSteps=entry.defaults.steps,
        defaultScheduler=entry.defaults.scheduler,
        defaultCFG=entry.defaults.cfg_scale,
        defaultStrength=entry.defaults.strength,
        aliases=list(entry.aliases),
        available=available,
        comment=comment,
    )
