"""The embedded VAE ``imagewire:tiny-vae@1`` (builder ``tiny-vae``): another VAE for the tiny model's
latents, as a fine-tuned VAE is for a real model's. Same shapes as the tiny model's own VAE, other
weights (another seed), saved as one diffusers model (``config.json`` and its weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from imagewire.air_registry.model_files import COMPONENT_CONFIG
from imagewire.air_registry.tiny.sd import _build_vae

MARKER = COMPONENT_CONFIG  # the file that shows a build is complete

_SEED = 31


def build(directory: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        vae = _build_vae(seed=_SEED)
    vae.save_pretrained(directory, safe_serialization=True)
