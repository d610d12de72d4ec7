"""Settings of the editing parameters of ``Client.image_inference``: outpainting and ControlNet."""

from __future__ import annotations

from dataclasses import dataclass

from imagewire_client.images import ImageSource


@dataclass(frozen=True)
class Outpaint:
    """Pixels to add on each side of the seed image (multiples of 64), and the boundary's soft edge (0–32)."""

    top: int = 0
    right: int = 0
    bottom: int = 0
    left: int = 0
    blur: int = 0


@dataclass(frozen=True)
class ControlNet:
    """One ControlNet: a catalog model of category ``controlnet`` and its guide image (any image form)."""

    model: str
    guide_image: ImageSource
    weight: float | None = None             # 0–1, default 1
    start_step: int | None = None           # or start_step_percentage (0–99)
    end_step: int | None = None             # or end_step_percentage (1–100)
    start_step_percentage: int | None = None
    end_step_percentage: int | None = None
    control_mode: str | None = None         # "balanced" (default), "prompt" or "controlnet"
