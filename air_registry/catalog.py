"""The model catalog: which AIR ids this server knows, where their weights are, and their defaults.

The catalog is data. ``catalog.json`` next to this module ships the built-in models; operators add
or replace models with their own files in the same format (see :meth:`Catalog.load`). A file entry:

    {"air": "mysite:portrait@2", "name": "Portrait v2", "aliases": ["portrait"],
     "architecture": "sd15", "category": "checkpoint", "tags": ["portrait"],
     "source": "folder", "location": "models/portrait-v2",
     "defaults": {"width": 512, "height": 768, "steps": 25, "scheduler": "DPM++ 2M Karras",
                  "CFGScale": 6.5, "strength": 0.7}}

``source`` says how ``location`` is read: ``embedded`` (built by this server: ``location`` names
the builder, see ``air_registry/tiny``),
``hub`` (a Hugging Face repo id, read from the local Hugging Face cache), ``folder`` (a model saved
in diffusers format) or ``single_file`` (a ``.safetensors``/``.ckpt`` checkpoint, or a FLUX transformer in a
``.gguf``). Missing ``defaults`` keys take the architecture's usual values (``architectures.py``). A
``single_file`` checkpoint in ``.safetensors`` or ``.gguf`` may leave ``architecture`` out: its tensors tell it
(``checkpoints.py``), and a stated one they contradict is an error. Where the weights
are is ``weights.py``'s business. A FLUX.1 or SD 3 checkpoint may say ``"quantize": "int8"`` (or ``float8``,
``none``) to have its transformer and T5 quantized on load whatever ``--quantize`` says (``quantize.py``).

``category`` is ``checkpoint`` (a whole model, the default) or what a request adds to one: ``lora``,
``embeddings`` (textual inversion) or ``vae``; for those, ``architecture`` is the architecture they fit.
An embedding also names its ``token``, the word that stands for it in prompts:

    {"air": "civitai:7808@9208", "name": "EasyNegative", "category": "embeddings", "architecture": "sd15",
     "token": "easynegative", "source": "single_file", "location": "embeddings/easynegative.safetensors"}

Nothing here imports torch or diffusers: the task layer resolves models before any device work.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagewire.air_registry.air import parse_air
from imagewire.air_registry.architectures import ARCHITECTURES, UNKNOWN_ARCHITECTURE, Architecture
from imagewire.air_registry.checkpoints import detect_architecture, matches, tensor_shapes
from imagewire.air_registry.errors import (
    CatalogError,
    MalformedAIR,
    RegistryError,
    SamplerUnusable,
    UnknownModel,
    UnknownSampler,
    shown,
)
from imagewire.air_registry.model_files import (
    ADD_ON_LAYOUTS,
    COMPONENT_CATEGORIES,
    COMPONENT_LAYOUT,
    SINGLE_FILE_SUFFIXES,
    WEIGHTS_FILE_SUFFIXES,
)
from imagewire.air_registry.quantized import QUANTIZE_MODES
from imagewire.air_registry.samplers import DEFAULT_NAME, FLOW, resolve_sampler
from imagewire.air_registry.tiny import BUILDERS

SHIPPED_CATALOG = Path(__file__).with_name("catalog.json")

SOURCES: tuple[str, ...] = ("embedded", "hub", "folder", "single_file")

# How many known models a "not found" message names; the catalog can be long.
_MODELS_NAMED_IN_ERRORS = 10
_ALLOWED_VALUES_LIMIT = 100


def _usual_defaults(architecture: Architecture) -> Mapping[str, Any]:
    """What a catalog entry gets for the ``defaults`` it leaves out."""
    return {
        "width": architecture.size,
        "height": architecture.size,
        "steps": architecture.steps,
        "scheduler": DEFAULT_NAME,
        "CFGScale": architecture.cfg_scale,
        "strength": architecture.strength,
    }

_ENTRY_KEYS = frozenset(
    {"air", "name", "aliases", "architecture", "category", "tags", "source", "location", "defaults", "token",
     "quantize", "compile"}
)
# What a request adds to a checkpoint: a single file is the usual form of each, with no pipeline to read.
ADD_ON_CATEGORIES: tuple[str, ...] = ("lora", "embeddings", "vae")
_DEFAULTS_KEYS = frozenset({"width", "height", "steps", "scheduler", "CFGScale", "strength"})
_HUB_REPO_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
# A file of a hub repo, as weights_file models name theirs: "owner/name/path/in/repo.pth".
_HUB_FILE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.+-]+)+")


def hub_file(location: str) -> tuple[str, str]:
    """The repo id and the file of a weights_file model's hub location."""
    owner, name, path = location.split("/", 2)
    return f"{owner}/{name}", path


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
    token: str = ""   # an embedding's word in prompts
    # Why the model cannot be used (a broken file in a models folder, ``models_dir.py``); empty: it can.
    problem: str = ""
    # Weight-only quantization on load of its transformer and T5 (``quantized.QUANTIZE_MODES``); empty: the
    # server's --quantize decides.
    quantize: str = ""
    # Whether its denoiser is compiled on load (``compile.py``); None: the server's --compile decides.
    compile: bool | None = None

    @property
    def label(self) -> str:
        """How messages name the model: ``Stable Diffusion 1.5 (imagewire:sd15@1)``."""
        return f"{self.name} ({self.air})"

    @property
    def layout(self) -> str:
        """How its files lie (``model_files.LAYOUT_MARKERS``)."""
        return layout_of(self.category, self.architecture)


def layout_of(category: str, architecture: str) -> str:
    """The architecture's layout, but for a model saved on its own (a ControlNet, a safety checker) or added
    to a checkpoint (a LoRA, an embedding, a VAE), which is catalogued under the architecture it fits."""
    if category in ADD_ON_LAYOUTS:
        return ADD_ON_LAYOUTS[category]
    return COMPONENT_LAYOUT if category in COMPONENT_CATEGORIES else ARCHITECTURES[architecture].layout


# ---------------------------------------------------------------- reading catalog files


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise CatalogError(problem)


def _string(raw: Mapping[str, Any], key: str, *, default: str | None = None) -> str:
    value = raw.get(key, default)
    _require(value is not None, f"'{key}' is required")
    _require(isinstance(value, str), f"'{key}' must be a string, not {shown(value)}")
    return str(value).strip()


def _string_list(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    _require(
        isinstance(value, list) and all(isinstance(item, str) and item.strip() for item in value),
        f"'{key}' must be a list of non-empty strings, not {shown(value)}",
    )
    return tuple(item.strip() for item in value)


def _number(raw: Mapping[str, Any], key: str, *, integer: bool) -> Any:
    value = raw[key]
    kind = "an integer" if integer else "a number"
    valid_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    _require(valid_type and not isinstance(value, bool), f"defaults.{key} must be {kind}, not {shown(value)}")
    return value


# Checks a request's values against the wire's limits; raises ValueError naming what is wrong. The
# limits are the wire schema's, so the task layer supplies the check (see ``Catalog.load``).
DefaultsCheck = Callable[["ModelDefaults"], None]


def _parse_defaults(raw: Any, architecture: str, check: DefaultsCheck | None) -> ModelDefaults:
    _require(raw is None or isinstance(raw, dict), f"'defaults' must be an object, not {shown(raw)}")
    given = dict(raw or {})
    unknown = sorted(set(given) - _DEFAULTS_KEYS)
    known = ", ".join(sorted(_DEFAULTS_KEYS))
    _require(not unknown, f"unknown keys in 'defaults': {', '.join(unknown)} (known: {known})")
    merged = {**_usual_defaults(ARCHITECTURES[architecture]), **given}
    scheduler = merged["scheduler"]
    _require(isinstance(scheduler, str), f"defaults.scheduler must be a string, not {shown(scheduler)}")
    try:
        spec = resolve_sampler(scheduler, ARCHITECTURES[architecture].sampling)
    except UnknownSampler as exc:
        raise CatalogError(f"defaults.scheduler {shown(scheduler)} is not a known scheduler name") from exc
    except SamplerUnusable as exc:
        raise CatalogError(f"defaults.scheduler {exc.problem}") from exc
    defaults = ModelDefaults(
        width=_number(merged, "width", integer=True),
        height=_number(merged, "height", integer=True),
        steps=_number(merged, "steps", integer=True),
        scheduler=DEFAULT_NAME if spec is None else spec.name,
        cfg_scale=float(_number(merged, "CFGScale", integer=False)),
        strength=float(_number(merged, "strength", integer=False)),
    )
    if check is not None:
        try:
            check(defaults)
        except ValueError as exc:
            raise CatalogError(str(exc)) from exc
    return defaults


def _parse_location(raw: Mapping[str, Any], source: str, base_dir: Path, layout: str = "diffusers") -> str:
    location = _string(raw, "location", default="")
    if source == "embedded":
        _require(location in BUILDERS,
                 f"'location' of an embedded model names its builder, one of {', '.join(BUILDERS)}; "
                 f"not {shown(location)}")
        return location
    _require(bool(location), f"a '{source}' model needs a 'location'")
    if source == "hub" and layout == "weights_file":
        _require(
            _HUB_FILE_PATTERN.fullmatch(location) is not None and location.lower().endswith(WEIGHTS_FILE_SUFFIXES),
            "'location' of a hub model of one weights file must be 'owner/name/file' with the file ending in "
            f"{' or '.join(WEIGHTS_FILE_SUFFIXES)}, not {shown(location)}",
        )
        return location
    if source == "hub":
        _require(
            _HUB_REPO_PATTERN.fullmatch(location) is not None,
            "'location' of a hub model must be a Hugging Face repo id like 'owner/name', "
            f"not {shown(location)}",
        )
        return location
    if source == "single_file":
        suffixes = WEIGHTS_FILE_SUFFIXES if layout == "weights_file" else SINGLE_FILE_SUFFIXES
        _require(
            location.lower().endswith(suffixes),
            f"'location' of a single_file model must end in {' or '.join(suffixes)}",
        )
    # Relative paths are relative to the catalog file, so a catalog and its models can move together.
    return str((base_dir / Path(location).expanduser()).resolve())


def _checkpoint_architecture(raw: Mapping[str, Any], source: str, category: str, base_dir: Path) -> str:
    """The entry's architecture: as stated, or for a checkpoint in one .safetensors file, as its tensors say
    (read from the file's header). A stated one that the file contradicts is an error naming both."""
    stated = _string(raw, "architecture", default="") if "architecture" in raw else ""
    location = raw.get("location")
    if source != "single_file" or category != "checkpoint" or not isinstance(location, str):
        return stated or _string(raw, "architecture")
    path = (base_dir / Path(location.strip()).expanduser()).resolve()
    if not path.name.lower().endswith((".safetensors", ".gguf")):
        _require(bool(stated), f"'architecture' is required for {path.name}: only a .safetensors or .gguf file's "
                               "architecture can be read without loading it")
        return stated
    try:
        detected = detect_architecture(tensor_shapes(path))
    except RegistryError as exc:
        # A stated architecture stands for a file that is not there yet; the load says what is wrong.
        _require(bool(stated), f"'architecture' is not given and the file {path} {exc.problem}")
        return stated
    _require(not stated or matches(stated, detected),
             f"'architecture' is {stated!r} but the file {path} is a {detected!r} checkpoint by its tensors; "
             f"state {detected!r} or leave 'architecture' out")
    return stated or detected


def usual_defaults(architecture: str) -> ModelDefaults:
    """The defaults of a model of ``architecture`` that states none."""
    usual = _usual_defaults(ARCHITECTURES[architecture])
    return ModelDefaults(width=usual["width"], height=usual["height"], steps=usual["steps"],
                         scheduler=usual["scheduler"], cfg_scale=usual["CFGScale"], strength=usual["strength"])


def parse_entry(raw: Any, base_dir: Path, check: DefaultsCheck | None = None) -> ModelEntry:
    """One catalog entry from its JSON form; relative locations are relative to ``base_dir``."""
    return _parse_entry(raw, base_dir, check)


def _parse_entry(raw: Any, base_dir: Path, check: DefaultsCheck | None) -> ModelEntry:
    _require(isinstance(raw, dict), f"an entry must be an object, not {shown(raw)}")
    unknown = sorted(set(raw) - _ENTRY_KEYS)
    _require(not unknown, f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(_ENTRY_KEYS))})")
    try:
        air = parse_air(_string(raw, "air"))
    except MalformedAIR as exc:
        raise CatalogError(
            f"'air' must have the form source:id@version, not {shown(raw['air'])}"
        ) from exc
    source = _string(raw, "source")
    _require(source in SOURCES, f"'source' must be one of {', '.join(SOURCES)}, not {source!r}")
    category = _string(raw, "category", default="checkpoint")
    architecture = _checkpoint_architecture(raw, source, category, base_dir)
    known = [name for name in ARCHITECTURES if name != UNKNOWN_ARCHITECTURE]
    _require(architecture in known, f"'architecture' must be one of {', '.join(known)}, not {architecture!r}")
    layout = layout_of(category, architecture)
    # A checkpoint in one file needs the pipeline class that reads it; add-ons and single networks are read on
    # their own.
    _require(
        source != "single_file" or category in ADD_ON_CATEGORIES
        or ARCHITECTURES[architecture].single_file_pipeline is not None or layout == "weights_file",
        f"the {architecture!r} architecture cannot be loaded from a single file",
    )
    name = _string(raw, "name")
    _require(bool(name), "'name' must not be empty")
    token = _string(raw, "token", default="")
    _require(category != "embeddings" or bool(token),
             "an 'embeddings' model needs a 'token': the word that stands for it in prompts")
    _require(not token or category == "embeddings", "only an 'embeddings' model has a 'token'")
    quantize = _string(raw, "quantize", default="")
    _require(not quantize or quantize in QUANTIZE_MODES,
             f"'quantize' must be one of {', '.join(QUANTIZE_MODES)}, not {shown(quantize)}")
    # Weight-only quantization reaches linear layers: a transformer's and T5's, not a UNet's convolutions.
    _require(quantize in ("", "none") or (category == "checkpoint" and ARCHITECTURES[architecture].sampling == FLOW),
             "'quantize' applies to checkpoints of transformer models (FLUX.1, SD 3), whose weights are mostly "
             "linear layers")
    compile = raw.get("compile")
    _require(compile is None or isinstance(compile, bool), f"'compile' must be true or false, not {shown(compile)}")
    _require(compile is None or (category == "checkpoint" and ARCHITECTURES[architecture].task == "imageInference"),
             "'compile' applies to checkpoints that make images, whose denoiser it compiles")
    return ModelEntry(
        air=str(air),
        name=name,
        version=air.version,
        architecture=architecture,
        category=category,
        aliases=_string_list(raw, "aliases"),
        tags=_string_list(raw, "tags"),
        source=source,
        location=_parse_location(raw, source, base_dir, layout),
        defaults=_parse_defaults(raw.get("defaults"), architecture, check),
        token=token,
        quantize=quantize,
        compile=compile,
    )


def _read_catalog_file(path: Path, check: DefaultsCheck | None) -> list[tuple[ModelEntry, str]]:
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
            entries.append((_parse_entry(raw, path.parent, check), origin))
        except CatalogError as exc:
            raise CatalogError(f"{origin}: {exc}") from exc
    return entries


def read_catalog_file(path: Path, *, check_defaults: DefaultsCheck | None = None) -> list[tuple[ModelEntry, str]]:
    """The entries of one catalog file, each with where it came from; CatalogError if it is malformed."""
    return _read_catalog_file(path, check_defaults)


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
    def load(cls, extra_files: Sequence[Path] = (), *, check_defaults: DefaultsCheck | None = None) -> Catalog:
        """The shipped catalog, then each of ``extra_files`` in order.

        An entry with the AIR of an earlier one replaces it (in its place); an alias claimed by a
        later entry moves to it. A malformed file raises :class:`CatalogError` (a ``ValueError``)
        naming the file and the entry. ``check_defaults`` holds each entry's defaults to the limits
        a request has (the server passes the wire schema's); without it only their types are checked.
        """
        merged: dict[str, tuple[ModelEntry, str]] = {}
        for path in (SHIPPED_CATALOG, *(Path(extra) for extra in extra_files)):
            for entry, origin in _read_catalog_file(path, check_defaults):
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

    def add(self, entry: ModelEntry) -> None:
        """Add a model while the server runs (one fetched for a client), or replace the one of its AIR."""
        self.entries = (*(known for known in self.entries if known.air != entry.air), entry)
        self._by_air[entry.air] = entry
        for alias in entry.aliases:
            self._by_alias[alias.casefold()] = entry

    def remove(self, air: str) -> None:
        """Take a model out while the server runs (its file left a models folder); an alias it had claimed goes
        back to the latest other entry that has it."""
        entry = self._by_air.pop(air, None)
        if entry is None:
            return
        self.entries = tuple(known for known in self.entries if known.air != air)
        for alias in entry.aliases:
            folded = alias.casefold()
            if self._by_alias.get(folded) is not entry:
                continue
            del self._by_alias[folded]
            for other in reversed(self.entries):
                if any(name.casefold() == folded for name in other.aliases):
                    self._by_alias[folded] = other
                    break

    def get(self, air: str) -> ModelEntry | None:
        return self._by_air.get(air)

    def resolve(self, name: str) -> ModelEntry:
        """The entry a client's ``model`` value names: an AIR id or one of the catalog's aliases."""
        text = name.strip() if isinstance(name, str) else ""
        try:
            air: str | None = str(parse_air(text))
        except MalformedAIR:
            air = None
        if air is not None and air in self._by_air:
            return self._by_air[air]
        entry = self._by_alias.get(text.casefold())
        if entry is not None:
            return entry
        if air is None:
            raise MalformedAIR(
                "must be an AIR id of the form source:id@version, like 'runware:101@1', or an alias "
                f"of a model of this server ({self._describe_known()}); received {shown(name)}",
                allowed_values=self._allowed_values())
        raise UnknownModel(
            f"{shown(name)} is not in this server's catalog; known models: {self._describe_known()}",
            allowed_values=self._allowed_values())

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

    def serving(self, task: str) -> list[ModelEntry]:
        """The models of the task type ``task`` (``imageInference``, ``imageUpscale``, …)."""
        return [entry for entry in self.entries if ARCHITECTURES[entry.architecture].task == task]

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
