"""How models lie on disk: the files that make a diffusers folder, a single-file checkpoint, a hub
download. One place for names that the catalog, the weights lookup and the builders all read."""

from __future__ import annotations

# A folder in diffusers format has this index of its components.
MODEL_INDEX = "model_index.json"
SINGLE_FILE_SUFFIXES: tuple[str, ...] = (".safetensors", ".ckpt")

# What a hub download fetches: the diffusers-format components only. Model repos also carry
# full-size single-file checkpoints, fp16 and non-EMA copies and a safety checker, many times the
# size of what the server loads.
HUB_INCLUDE: tuple[str, ...] = (MODEL_INDEX, "*/*.json", "*/*.txt", "*/*.safetensors")
HUB_EXCLUDE: tuple[str, ...] = ("*.fp16.*", "*non_ema*", "safety_checker/*")

# A single model saved on its own (a ControlNet, a safety checker) has this config instead of an index.
COMPONENT_CONFIG = "config.json"
# What a hub download of such a model fetches: its configs (the model's, an image processor's) and weights.
COMPONENT_HUB_INCLUDE: tuple[str, ...] = ("*.json", "*.safetensors")
# Categories of catalog entries that are one model rather than a pipeline.
COMPONENT_CATEGORIES: frozenset[str] = frozenset({"controlnet", "safety"})


def saved_marker(category: str) -> str:
    """The file whose presence says a model of ``category`` is saved in a folder."""
    return COMPONENT_CONFIG if category in COMPONENT_CATEGORIES else MODEL_INDEX
