"""PIL images ⇄ torch tensors for the tool runners, without torchvision: float RGB in 0–1, channels first."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_tensor(images: Sequence[Image.Image], *, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A batch (N, 3, H, W) of RGB images of one size."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).to(device=device, dtype=dtype) / 255


def to_image(tensor: torch.Tensor) -> Image.Image:
    """One (3, H, W) or (1, H, W) tensor in 0–1 as an RGB or greyscale image."""
    values = (tensor.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if values.shape[0] == 1:
        return Image.fromarray(values[0].numpy())
    return Image.fromarray(values.permute(1, 2, 0).numpy())
