"""What a call adds to a loaded model: LoRAs, textual-inversion embeddings and VAEs, each loaded once per model
and switched per call, never by reloading the model.

- **LoRAs** load through diffusers' own LoRA loading (peft adapters, one per LoRA, named after its AIR) into the
  model's denoiser (a UNet, or FLUX's and SD 3's transformer) and text encoders; diffusers converts the formats
  trainers write (kohya/AUTOMATIC1111 and LyCORIS LoCon; for FLUX also XLabs and ai-toolkit). A call activates
  its set with ``set_adapters`` and its weights, or turns adapters off. LyCORIS formats diffusers has no layers
  for (LoHa, LoKr, OFT) are refused naming the format, and so is a LoRA that names no layer of the model. At
  most ``MAX_LORAS`` stay loaded per model, the least recently used going first.
- **Embeddings** are tokens added to the tokenizers with their vectors (times the request's weight) in the text
  encoders, through diffusers' textual-inversion loading. A token left in the tokenizer would change every
  prompt that spells it, so when a call wants another set than the last, the tokenizers go back to a pristine
  copy, the encoders to their original rows, and the wanted set is loaded; calls with the same set (the device
  batches them together) pay nothing.
- **VAEs** replace the model's own for a call (``pipe.vae``); at most ``MAX_VAES`` other VAEs stay loaded per model.

Everything here runs in the device worker thread, like the rest of the loader.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from safetensors.torch import load_file

from imagewire.air_registry.catalog import ModelEntry
from imagewire.air_registry.errors import AddOnUnusable, shown
from imagewire.air_registry.models_dir import unloadable_lora_format
from imagewire.air_registry.tiny import ensure_embedded
from imagewire.air_registry.weights import weights_file

logger = logging.getLogger(__name__)

MAX_LORAS = 16  # adapters kept loaded per model
MAX_VAES = 2    # VAEs besides the model's own kept loaded per model

# (tokenizer, text encoder) attribute pairs of the pipelines that have them; SDXL embeddings hold one tensor
# per encoder under these keys.
_TEXT_PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
_SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")


class WeightedModel(Protocol):
    """A catalog model with its weights and a strength (``tasks.jobs.AddOn`` is one)."""

    @property
    def model(self) -> ModelEntry: ...

    @property
    def weights(self) -> Path: ...

    @property
    def weight(self) -> float: ...


class ModelAddOns:
    """The add-ons loaded into one model's pipelines, and which of them the last call used."""

    def __init__(self, pipe: DiffusionPipeline, *, allow_downloads: bool) -> None:
        self._allow_downloads = allow_downloads
        self._adapters: OrderedDict[str, str] = OrderedDict()  # LoRA AIR → adapter name, least recent first
        self._own_vae: Any = getattr(pipe, "vae", None)
        self._vaes: OrderedDict[str, Any] = OrderedDict()      # VAE AIR → loaded VAE, least recent first
        self._embeddings: frozenset[tuple[str, float]] = frozenset()
        self._pristine: dict[str, Any] = {}   # tokenizer attribute → its state before any embedding
        self._rows: dict[str, int] = {}       # text encoder attribute → its token embedding rows then

    @property
    def loaded(self) -> list[str]:
        """AIR ids of the add-ons loaded into the model."""
        return [*self._adapters, *self._vaes, *(air for air, _ in self._embeddings)]

    def use(self, pipes: Sequence[DiffusionPipeline], *, loras: Sequence[WeightedModel] = (),
            embeddings: Sequence[WeightedModel] = (), vae: WeightedModel | None = None) -> None:
        """Make the next call of ``pipes`` (the model's pipelines; the first is the one it was loaded as) use
        these add-ons and no others."""
        primary = pipes[0]
        self._use_loras(primary, loras)
        self._use_embeddings(pipes, embeddings)
        chosen = self._own_vae if vae is None else self._vae(primary, vae)
        for pipe in pipes:
            if getattr(pipe, "vae", None) is not chosen:
                pipe.vae = chosen

    def to(self, device: str) -> None:
        """Move the VAEs kept beside the pipelines' current one with the model (the pipelines move that one)."""
        for vae in (self._own_vae, *self._vaes.values()):
            if vae is not None:
                vae.to(device)

    # ---------------------------------------------------------------- LoRAs

    def _use_loras(self, pipe: DiffusionPipeline, loras: Sequence[WeightedModel]) -> None:
        for lora in loras:
            if lora.model.air in self._adapters:
                self._adapters.move_to_end(lora.model.air)
            else:
                self._load_lora(pipe, lora, keep={other.model.air for other in loras})
        if loras:
            # Adapters left out of the list are inactive for the call; enable undoes an earlier disable.
            pipe.enable_lora()
            pipe.set_adapters([self._adapters[lora.model.air] for lora in loras],
                              adapter_weights=[lora.weight for lora in loras])
        elif self._adapters:
            pipe.disable_lora()

    def _load_lora(self, pipe: DiffusionPipeline, lora: WeightedModel, *, keep: set[str]) -> None:
        for air in [air for air in self._adapters if air not in keep][: max(0, len(self._adapters) + 1 - MAX_LORAS)]:
            with _expected_peft_warnings():
                pipe.delete_adapters(self._adapters.pop(air))
            logger.info("unloaded LoRA %s to make room", air)
        entry = lora.model
        name = _adapter_name(entry.air, taken=set(self._adapters.values()))
        path = _add_on_path(lora)
        try:
            # Read here rather than by diffusers, so that a folder, a hub snapshot and a single file are alike.
            tensors = load_file(str(path))
        except Exception as exc:
            raise _unusable(entry, "a LoRA", exc) from exc
        _refuse_unloadable_format(entry, tensors)
        try:
            with _expected_peft_warnings():
                pipe.load_lora_weights(tensors, adapter_name=name)
        except Exception as exc:
            _forget_adapter(pipe, name)
            raise _unusable(entry, "a LoRA of this model", exc) from exc
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            # diffusers skips what names no layer of the model (with a log line): a LoRA for another model's
            # layer names would otherwise answer images as if it were not there.
            raise AddOnUnusable(
                f"{entry.label} names no layer of this model: none of its {len(tensors)} tensors (named like "
                f"{shown(min(tensors, default=''), 80)}) is a LoRA update of this model's denoiser or text encoders "
                "as diffusers reads them, so it is a LoRA of another architecture, or in a format diffusers does "
                "not convert for this one (SD 3 LoRAs load in diffusers' own format only)", air=entry.air)
        self._adapters[entry.air] = name
        logger.info("loaded LoRA %s as adapter %s", entry.air, name)

    # ---------------------------------------------------------------- embeddings

    def _use_embeddings(self, pipes: Sequence[DiffusionPipeline], embeddings: Sequence[WeightedModel]) -> None:
        wanted = frozenset((embedding.model.air, embedding.weight) for embedding in embeddings)
        if wanted == self._embeddings:
            return
        primary = pipes[0]
        pairs = [(tokenizer, encoder) for tokenizer, encoder in _TEXT_PAIRS
                 if getattr(primary, tokenizer, None) is not None and getattr(primary, encoder, None) is not None]
        if not self._pristine:
            for tokenizer, encoder in pairs:
                self._pristine[tokenizer] = getattr(primary, tokenizer)
                self._rows[encoder] = getattr(primary, encoder).get_input_embeddings().weight.shape[0]
        # Back to the model as loaded: fresh tokenizers (the pristine ones are never touched) and the
        # encoders' original rows.
        self._embeddings = frozenset()
        for tokenizer, encoder in pairs:
            fresh = copy.deepcopy(self._pristine[tokenizer])
            for pipe in pipes:
                setattr(pipe, tokenizer, fresh)
            text_encoder = getattr(primary, encoder)
            if text_encoder.get_input_embeddings().weight.shape[0] != self._rows[encoder]:
                text_encoder.resize_token_embeddings(self._rows[encoder])
        for embedding in embeddings:
            self._load_embedding(primary, pairs, embedding)
        self._embeddings = wanted

    def _load_embedding(self, pipe: DiffusionPipeline, pairs: list[tuple[str, str]], embedding: WeightedModel) -> None:
        entry = embedding.model
        path = _add_on_path(embedding)
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise _unusable(entry, "an embedding", exc) from exc
        if len(pairs) > 1:
            missing = [key for key in _SDXL_EMBEDDING_KEYS if key not in tensors]
            if missing:
                raise AddOnUnusable(
                    f"{entry.label} is not an embedding for this model's two text encoders: it has no "
                    f"{missing[0]} vectors ({' and '.join(_SDXL_EMBEDDING_KEYS)} are needed)", air=entry.air)
            vectors = [tensors[key] for key in _SDXL_EMBEDDING_KEYS]
        elif len(tensors) == 1:
            vectors = list(tensors.values())
        else:
            raise AddOnUnusable(f"{entry.label} holds {len(tensors)} tensors; an embedding for this model holds "
                                "one, its vectors", air=entry.air)
        try:
            for (tokenizer, encoder), tensor in zip(pairs, vectors, strict=True):
                pipe.load_textual_inversion(
                    (tensor * embedding.weight).contiguous(), token=entry.token,
                    tokenizer=getattr(pipe, tokenizer), text_encoder=getattr(pipe, encoder))
        except Exception as exc:
            raise _unusable(entry, "an embedding of this model", exc) from exc

    # ---------------------------------------------------------------- VAEs

    def _vae(self, pipe: DiffusionPipeline, vae: WeightedModel) -> Any:
        entry = vae.model
        if entry.air in self._vaes:
            self._vaes.move_to_end(entry.air)
            return self._vaes[entry.air]
        while len(self._vaes) >= MAX_VAES:
            evicted = next(iter(self._vaes))
            del self._vaes[evicted]
            logger.info("unloaded VAE %s to make room", evicted)
        path = _add_on_path(vae)
        dtype = getattr(self._own_vae, "dtype", torch.float32)
        try:
            if path.is_file():
                # A VAE that fits the model has its VAE's shapes: read with its config, nothing from the hub.
                with tempfile.TemporaryDirectory(prefix="imagewire-vae-config-") as folder:
                    self._own_vae.save_config(Path(folder) / "vae")
                    loaded: Any = AutoencoderKL.from_single_file(
                        str(path), config=folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
            else:
                loaded = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype)
            loaded.to(pipe.device)
        except Exception as exc:
            raise _unusable(entry, "a VAE", exc) from exc
        if loaded.config.latent_channels != self._own_vae.config.latent_channels:
            raise AddOnUnusable(
                f"{entry.label} makes {loaded.config.latent_channels}-channel latents and this model "
                f"{self._own_vae.config.latent_channels}-channel ones", air=entry.air)
        self._vaes[entry.air] = loaded
        logger.info("loaded VAE %s", entry.air)
        return loaded


def _add_on_path(add_on: WeightedModel) -> Path:
    """The add-on's weights: its file (LoRAs, embeddings) or folder (VAEs), built first if it is embedded."""
    entry, path = add_on.model, Path(add_on.weights)
    if entry.source == "embedded":
        path = ensure_embedded(entry.location, path)
    if entry.category == "vae":
        return path
    found = weights_file(path, entry.category)
    if found is None:
        raise AddOnUnusable(f"the weights file of {entry.label} is missing", air=entry.air)
    return found


def _refuse_unloadable_format(entry: ModelEntry, tensors: dict[str, Any]) -> None:
    format_name = unloadable_lora_format(tensors)
    if format_name is not None:
        raise AddOnUnusable(
            f"{entry.label} is a {format_name}, a format this server does not load; LoRAs load in the "
            "kohya/AUTOMATIC1111 format (LyCORIS LoCon included), the diffusers/peft format, and for FLUX "
            "XLabs' and ai-toolkit's", air=entry.air)


def _adapter_name(air: str, *, taken: set[str]) -> str:
    # peft keeps adapters in module dictionaries, whose keys may not hold dots.
    base = "lora_" + re.sub(r"[^A-Za-z0-9_]", "_", air)
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    return name


@contextlib.contextmanager
def _expected_peft_warnings() -> Iterator[None]:
    """peft warns when a model with an adapter gets another, and when the active adapter is deleted: several
    adapters, switched per call, are the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted", category=UserWarning)
        yield


def _forget_adapter(pipe: DiffusionPipeline, name: str) -> None:
    """Remove what a failed load injected, so that the model is as it was."""
    try:
        with _expected_peft_warnings():
            pipe.delete_adapters(name)
    except Exception:  # nothing was injected, or only some layers: either way nothing else to undo
        logger.debug("no adapter %s to remove after a failed load", name, exc_info=True)


def _unusable(entry: ModelEntry, what: str, exc: BaseException) -> AddOnUnusable:
    # The library's own message can hold paths and shapes: the log has it, the client gets its kind.
    logger.warning("%s does not load as %s", entry.air, what, exc_info=exc)
    return AddOnUnusable(f"the weights of {entry.label} do not load as {what} ({type(exc).__name__})",
                         air=entry.air)
