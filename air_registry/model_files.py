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

# One diffusers model rather than a pipeline (a VAE): its folder has this config beside its weights.
COMPONENT_CONFIG = "config.json"
# The names diffusers gives a LoRA's and a textual-inversion embedding's weights file in a folder.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
EMBEDDING_WEIGHTS = "learned_embeds.safetensors"
