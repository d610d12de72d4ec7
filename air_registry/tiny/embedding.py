"""The embedded textual-inversion embedding ``imagewire:tiny-embedding@1`` (builder ``tiny-embedding``):
two learned token vectors for the tiny model's text encoder, saved in diffusers' format
(``learned_embeds.safetensors``: ``{token: tensor[vectors, width]}``).

Two vectors, as most trained embeddings have several: the prompt's one token then stands for two, the
expansion a real embedding needs. The vectors are random, from a fixed seed, at the scale of the text
encoder's own token embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from imagewire.air_registry.model_files import EMBEDDING_WEIGHTS
from imagewire.air_registry.tiny.sd import CROSS_ATTENTION_DIM

MARKER = EMBEDDING_WEIGHTS  # the file that shows a build is complete

TOKEN = "<tiny-embedding>"
VECTORS = 2
_SEED = 21
# Roughly the spread of the tiny text encoder's token embeddings (initialised with std 0.02) times the
# growth trained embeddings show; large enough that the token visibly steers an image.
_SCALE = 0.5


def build(directory: Path) -> None:
    generator = torch.Generator("cpu").manual_seed(_SEED)
    vectors = torch.randn(VECTORS, CROSS_ATTENTION_DIM, generator=generator) * _SCALE
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file({TOKEN: vectors.contiguous()}, str(Path(directory) / EMBEDDING_WEIGHTS))
