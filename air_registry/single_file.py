"""What a single-file checkpoint needs beside its weights, made here so that loading one never reaches the hub.

diffusers reads a single file against a folder in diffusers format that holds everything but the weights:
``model_index.json``, each component's ``config.json``, the sampler's config and the tokenizers. This module
writes that folder from our own tables (``pipeline_configs.py``) and from tokenizer data found on this
machine:

- CLIP's byte-level BPE vocabulary comes from the ``open-clip-torch`` package (MIT licence), which ships
  OpenAI's ``bpe_simple_vocab_16e6.txt.gz``; it is read as a data file, without importing the package.
- T5's SentencePiece tokenizer (FLUX, SD 3) ships with no permissively licensed package: it is looked for
  in the folders named by ``tokenizer_dirs`` (``<dir>/t5/tokenizer.json`` or ``spiece.model``) and in the
  local Hugging Face cache, and a missing one is an error naming the file and every place looked in.

Pure Python: nothing here imports torch or diffusers.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from imagewire.air_registry.errors import WeightsMissing
from imagewire.air_registry.model_files import MODEL_INDEX
from imagewire.air_registry.pipeline_configs import CLIP, PIPELINE_CONFIGS, T5, Component, TokenizerSpec

CLIP_VOCABULARY_PACKAGE = "open_clip"  # the import name of open-clip-torch
CLIP_VOCABULARY_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary: 256 bytes, the same word-final, 48,894 merges and the two markers.
_CLIP_MERGES = 49408 - 256 * 2 - 2
CLIP_START = "<|startoftext|>"
CLIP_END = "<|endoftext|>"

# Where a T5 tokenizer may already be: in the Hugging Face cache, as these repos keep it.
T5_HUB_FILES: tuple[tuple[str, str], ...] = (
    ("google/t5-v1_1-xxl", "tokenizer.json"),
    ("google/t5-v1_1-xxl", "spiece.model"),
    ("black-forest-labs/FLUX.1-dev", "tokenizer_2/tokenizer.json"),
    ("black-forest-labs/FLUX.1-schnell", "tokenizer_2/tokenizer.json"),
    ("stabilityai/stable-diffusion-3-medium-diffusers", "tokenizer_3/tokenizer.json"),
)
T5_FILES: tuple[str, ...] = ("tokenizer.json", "spiece.model")
# Bumped when what a written folder holds changes, so that older folders are written again.
_FORMAT = 1
_STAMP = ".imagewire-config"


class TokenizerMissing(WeightsMissing):
    """A tokenizer's data is nowhere on this machine; the message names the file and where it was looked for."""


def clip_vocabulary_path() -> Path | None:
    """OpenAI's CLIP BPE file shipped inside the open-clip-torch package, found without importing it."""
    spec = importlib.util.find_spec(CLIP_VOCABULARY_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / CLIP_VOCABULARY_FILE
        if candidate.is_file():
            return candidate
    return None


def _byte_characters() -> list[str]:
    """The characters byte-level BPE stands the 256 byte values with, in CLIP's vocabulary order: the
    printable bytes as themselves first, then the others shifted past 255 in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in set(printable)]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(others))]


def write_clip_tokenizer(directory: Path, spec: TokenizerSpec) -> None:
    """vocab.json, merges.txt and tokenizer_config.json of CLIP's tokenizer, from the packaged BPE file."""
    source = clip_vocabulary_path()
    if source is None:
        raise TokenizerMissing(
            f"the CLIP tokenizer's vocabulary ({CLIP_VOCABULARY_FILE}) is not on this server: it ships with the "
            "open-clip-torch package; install it with `pip install --no-deps open-clip-torch`")
    lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
    merges = [line for line in lines[1 : 1 + _CLIP_MERGES] if line]
    characters = _byte_characters()
    tokens = [*characters, *(character + "</w>" for character in characters),
              *("".join(merge.split()) for merge in merges), CLIP_START, CLIP_END]
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "vocab.json", "w", encoding="utf-8") as file:
        json.dump({token: index for index, token in enumerate(tokens)}, file, ensure_ascii=False)
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": spec.max_length, "do_lower_case": True,
        "bos_token": CLIP_START, "eos_token": CLIP_END, "unk_token": CLIP_END, "pad_token": spec.pad_token,
    })


def find_t5_tokenizer(tokenizer_dirs: Sequence[Path]) -> Path | None:
    """A T5 tokenizer file on this machine: in a folder an operator named, or in the Hugging Face cache."""
    for folder in tokenizer_dirs:
        for name in T5_FILES:
            candidate = Path(folder) / "t5" / name
            if candidate.is_file():
                return candidate
    from huggingface_hub import try_to_load_from_cache

    for repo, filename in T5_HUB_FILES:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _t5_places(tokenizer_dirs: Sequence[Path]) -> str:
    local = [f"{Path(folder) / 't5'}/{' or '.join(T5_FILES)}" for folder in tokenizer_dirs]
    hub = [f"'{filename}' of {repo}" for repo, filename in T5_HUB_FILES]
    return "; ".join([*local, "the Hugging Face cache (" + ", ".join(hub) + ")"])


def write_t5_tokenizer(directory: Path, spec: TokenizerSpec, tokenizer_dirs: Sequence[Path]) -> None:
    found = find_t5_tokenizer(tokenizer_dirs)
    if found is None:
        raise TokenizerMissing(
            "the T5 tokenizer these models need (tokenizer.json or spiece.model of google/t5-v1_1-xxl) is not on "
            f"this server; looked in: {_t5_places(tokenizer_dirs)}. Put one of those files there, e.g. "
            "`hf download google/t5-v1_1-xxl spiece.model tokenizer.json`")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found, directory / found.name)
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "T5Tokenizer", "model_max_length": spec.max_length, "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": 100,
    })


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_component(directory: Path, component: Component, tokenizer_dirs: Sequence[Path]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if component.tokenizer is not None:
        if component.tokenizer.kind == CLIP:
            write_clip_tokenizer(directory, component.tokenizer)
        elif component.tokenizer.kind == T5:
            write_t5_tokenizer(directory, component.tokenizer, tokenizer_dirs)
        return
    if component.class_name.endswith("Scheduler"):
        _write_json(directory / "scheduler_config.json", {**component.config, "_class_name": component.class_name})
    elif component.library == "diffusers":
        _write_json(directory / "config.json", {**component.config, "_class_name": component.class_name})
    else:
        model_type = "t5" if component.class_name.startswith("T5") else "clip_text_model"
        _write_json(directory / "config.json",
                    {**component.config, "architectures": [component.class_name], "model_type": model_type})


def config_folder(architecture: str, root: Path, *, leave_out: Iterable[str] = (),
                  tokenizer_dirs: Sequence[Path] = ()) -> Path:
    """The folder of ``architecture``'s configs under ``root`` (written on first use), without the components
    named in ``leave_out`` (optional ones the checkpoint lacks). Written to a temporary sibling and renamed,
    so a folder is complete or absent."""
    table = PIPELINE_CONFIGS[architecture]
    left_out = sorted(set(leave_out))
    name = architecture + "".join(f"-no-{component}" for component in left_out)
    path = Path(root) / name
    if (path / _STAMP).is_file() and (path / _STAMP).read_text(encoding="utf-8").strip() == str(_FORMAT):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.writing-", dir=path.parent))
    try:
        index: dict[str, object] = {"_class_name": table.pipeline, **table.options}
        for component_name, component in table.components.items():
            if component is None or component_name in left_out:
                index[component_name] = [None, None]
                continue
            index[component_name] = [component.library, component.class_name]
            _write_component(staging / component_name, component, tokenizer_dirs)
        _write_json(staging / MODEL_INDEX, index)
        (staging / _STAMP).write_text(f"{_FORMAT}\n", encoding="utf-8")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def missing_components(architecture: str, names: Iterable[str]) -> list[str]:
    """The components of ``architecture`` with weights (a denoiser, a VAE, text encoders) that a checkpoint with
    these tensor names lacks: a FLUX transformer saved alone, an SD 3 file without its T5."""
    table = PIPELINE_CONFIGS[architecture]
    keys = list(names)
    missing = []
    for component_name, component in table.components.items():
        if component is None or not component.weights_prefixes:
            continue
        prefixes = component.weights_prefixes
        if "" in prefixes:
            continue  # a denoiser saved alone has bare names: it is what the file is
        if not any(key.startswith(prefixes) for key in keys):
            missing.append(component_name)
    return missing


# ---------------------------------------------------------------- the pieces of a denoiser saved alone

# Where a models folder keeps the pieces that complete a denoiser saved alone (ComfyUI's layout; ``models_dir``).
PIECE_FOLDERS: tuple[str, ...] = ("text_encoders", "clip", "vae")
# The subfolders a denoiser saved alone lies in, whose parent is then the models folder.
DENOISER_FOLDERS: tuple[str, ...] = ("diffusion_models", "unet", "checkpoints", "stable-diffusion")
_PIECE_NAMES = {"clip_l": "a CLIP-L text encoder", "clip_g": "a CLIP-G text encoder",
                "t5": "a T5-XXL text encoder", "vae16": "a 16-channel VAE", "vae4": "a 4-channel VAE"}


def piece_kind(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """What a file of a models folder's ``text_encoders/``, ``clip/`` or ``vae/`` is, from its tensors: ``clip_l``,
    ``clip_g``, ``t5``, ``vae16`` or ``vae4``; None for anything else."""
    if "shared.weight" in shapes and any(name.startswith("encoder.block.") for name in shapes):
        return "t5"
    norm = next((name for name in shapes if name.endswith("text_model.final_layer_norm.weight")), None)
    if norm is not None:
        return {768: "clip_l", 1280: "clip_g"}.get(int(list(shapes[norm])[0]))
    conv = shapes.get("decoder.conv_in.weight")
    if conv is not None and len(conv) == 4:
        return {16: "vae16", 4: "vae4"}.get(int(list(conv)[1]))
    return None


def wanted_piece(component: Component) -> str | None:
    """The kind of piece (``piece_kind``) that stands for ``component``."""
    if component.class_name == "AutoencoderKL":
        return "vae16" if component.config.get("latent_channels") == 16 else "vae4"
    if component.class_name.startswith("CLIPTextModel"):
        return {768: "clip_l", 1280: "clip_g"}.get(int(component.config.get("hidden_size", 0)))
    if component.class_name == "T5EncoderModel":
        return "t5"
    return None


def piece_folders(checkpoint: Path) -> list[Path]:
    """The folders a denoiser saved alone at ``checkpoint`` is completed from: those of its own models folder, when
    it lies in one (``<models>/diffusion_models/...``). Nothing outside that models folder is looked at."""
    for parent in checkpoint.parents:
        if parent.name.casefold() in DENOISER_FOLDERS:
            return [parent.parent / name for name in PIECE_FOLDERS]
    return []


def find_pieces(architecture: str, components: Iterable[str], checkpoint: Path,
                read_shapes: Callable[[Path], Mapping[str, Sequence[int]]]) -> dict[str, Path]:
    """A file for each of ``components`` of ``architecture`` among the pieces beside ``checkpoint``, by its tensors
    (the first in name order of the right kind); those with none are left out."""
    table = PIPELINE_CONFIGS[architecture]
    wanted: dict[str, str] = {}
    for name in components:
        component = table.components.get(name)
        kind = wanted_piece(component) if component is not None else None
        if kind is not None:
            wanted[name] = kind
    found: dict[str, Path] = {}
    for folder in piece_folders(checkpoint):
        candidates = sorted(folder.rglob("*.safetensors")) if folder.is_dir() else []
        for candidate in candidates:
            try:
                kind = piece_kind(read_shapes(candidate))
            except Exception:  # a broken piece is not a piece: it is passed over
                continue
            for name, wanted_kind in wanted.items():
                if kind == wanted_kind and name not in found:
                    found[name] = candidate
    return found


def missing_pieces_message(architecture: str, components: Sequence[str], checkpoint: Path) -> str:
    """What a denoiser saved alone lacks, what would stand for each, and where that was looked for."""
    table = PIPELINE_CONFIGS[architecture]
    described = []
    for name in components:
        component = table.components.get(name)
        kind = wanted_piece(component) if component is not None else None
        described.append(f"{name} ({_PIECE_NAMES[kind]})" if kind else name)
    folders = piece_folders(checkpoint)
    where = (f"looked for them in {', '.join(str(folder) for folder in folders)}" if folders else
             "pieces are looked for only beside a file in a models folder's diffusion_models/, unet/ or "
             "checkpoints/ (in its text_encoders/, clip/ and vae/)")
    return (f"holds only some of the model: it lacks {', '.join(described)}; {where}. Put those files there, or use "
            "a checkpoint that includes them")


# ---------------------------------------------------------------- ControlNets

# What a ControlNet's config takes from its UNet's: the encoder half's shapes (diffusers' ControlNetModel arguments).
_CONTROLNET_KEYS = frozenset({
    "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
    "num_attention_heads", "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", "addition_embed_type_num_heads", "upcast_attention",
})
CONTROLNET_SUBFOLDER = "controlnet"
# diffusers' ControlNetModel guide-image encoder widths when its config names none: every published ControlNet's.
_USUAL_GUIDE_CHANNELS = (16, 32, 96, 256)
# Where a ControlNet file keeps that encoder: its first convolution, then pairs of convolutions, the second of
# each pair with stride 2 (diffusers' layout, and the original one, where a SiLU sits between them).
_GUIDE_ENCODER_LAYOUTS = (("controlnet_cond_embedding.conv_in.weight", "controlnet_cond_embedding.blocks.{}.weight",
                           lambda pair: 2 * pair + 1),
                          ("input_hint_block.0.weight", "input_hint_block.{}.weight", lambda pair: 4 * pair + 4))


def controlnet_guide_channels(shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...] | None:
    """The widths of the guide-image encoder of a ControlNet file with tensors ``shapes`` (diffusers'
    ``conditioning_embedding_out_channels``), where they differ from the usual ones; None where they do not,
    or where the file has no encoder in either layout."""
    by_suffix: dict[str, Sequence[int]] = {}
    for name, shape in shapes.items():
        for first, _, _ in _GUIDE_ENCODER_LAYOUTS:
            cut = name.find(first.split(".", 1)[0] + ".")
            if cut >= 0:
                by_suffix[name[cut:]] = shape
    for first, strided, index in _GUIDE_ENCODER_LAYOUTS:
        if first not in by_suffix:
            continue
        channels = [int(by_suffix[first][0])]
        pair = 0
        while strided.format(index(pair)) in by_suffix:
            channels.append(int(by_suffix[strided.format(index(pair))][0]))
            pair += 1
        return None if tuple(channels) == _USUAL_GUIDE_CHANNELS else tuple(channels)
    return None


def controlnet_config_folder(architecture: str, root: Path, *, unet: Mapping[str, Any] | None = None,
                             guide_channels: Sequence[int] | None = None) -> Path | None:
    """A folder whose ``controlnet/config.json`` is the config of a ControlNet for ``architecture``'s UNet (written on
    first use); None where the architecture has no UNet table and no ``unet`` config is given (an embedded
    model's, for the architectures whose configs come from one). ``guide_channels``: the widths of the file's
    guide-image encoder, where they are not diffusers' usual ones (``controlnet_guide_channels``)."""
    if unet is None:
        table = PIPELINE_CONFIGS.get(architecture)
        component = table.components.get("unet") if table is not None else None
        if component is None:
            return None
        unet = component.config
    name = f"{architecture}-controlnet"
    if guide_channels is not None:
        name += "-guide-" + "-".join(str(width) for width in guide_channels)
    path = Path(root) / name
    config = path / CONTROLNET_SUBFOLDER / "config.json"
    if config.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.writing-", dir=path.parent))
    try:
        (staging / CONTROLNET_SUBFOLDER).mkdir()
        # It reads the latents alone (an inpainting UNet's extra channels are not its) and a 3-channel guide image.
        guide = {} if guide_channels is None else {"conditioning_embedding_out_channels": list(guide_channels)}
        _write_json(staging / CONTROLNET_SUBFOLDER / "config.json", {
            **{key: value for key, value in unet.items() if key in _CONTROLNET_KEYS},
            "_class_name": "ControlNetModel", "in_channels": 4, "conditioning_channels": 3, **guide})
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.writing-", dir=path.parent))
    try:
        (staging / CONTROLNET_SUBFOLDER).mkdir()
        # It reads the latents alone (an inpainting UNet's extra channels are not its) and a 3-channel guide image.
        _write_json(staging / CONTROLNET_SUBFOLDER / "config.json", {
            **{key: value for key, value in unet.config.items() if key in _CONTROLNET_KEYS},
            "_class_name": "ControlNetModel", "in_channels": 4, "conditioning_channels": 3})
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
