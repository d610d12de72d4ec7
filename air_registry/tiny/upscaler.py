"""The embedded model ``imagewire:tiny-upscaler@1`` (builder ``tiny-upscaler``): a Real-ESRGAN compact
super-resolution network (SRVGGNet, ×4, the architecture of ``realesr-general-x4v3``) small enough to run
anywhere, with random weights.

It is spandrel's own implementation of that architecture, saved as a plain state dict, so it loads
through the same path as a downloaded Real-ESRGAN file: spandrel recognises the architecture and its
scale from the keys. The network adds its output to the nearest-neighbour enlargement of its input, so
even with random weights its pictures keep the input's structure, and a tiling seam would show.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from imagewire.air_registry.super_resolution import import_spandrel

WEIGHTS_FILE = "model.safetensors"
MARKER = WEIGHTS_FILE
SCALE = 4
_SEED = 11


def build(directory: Path) -> None:
    compact = import_spandrel().architectures.Compact
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        network = compact.Compact(num_feat=8, num_conv=2, upscale=SCALE)
    state = {name: tensor.contiguous() for name, tensor in network.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_FILE))
