"""Several ControlNets in one pipeline call, each with its own ``controlMode``.

diffusers sums the residuals of a ``MultiControlNetModel``'s nets, and knows one mode per call
(``guess_mode``). The public API sets ``controlMode`` per ControlNet, so the nets here are summed by
this subclass, which the ControlNet pipelines take wherever they take a multi-ControlNet:

- ``balanced``: the residuals as the net makes them (scaled by its ``weight``), for both halves of a
  classifier-free-guidance batch;
- ``prompt`` (the prompt matters more): the residuals of shallow blocks are damped, 0.825 per block
  from the middle block outwards, so the net sets the layout and the prompt the detail;
- ``controlnet`` (the ControlNet matters more): damped the same way, and added to the prompted half of
  the guidance batch only, so classifier-free guidance amplifies the guide as it amplifies the prompt.
  Without guidance (CFG scale of 1 or less) there is one half, and it is ``prompt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

_DAMPING = 0.825


def soft_weights(count: int) -> list[float]:
    """Residual weights for ``count`` residuals (down blocks, then the middle block): 1 for the middle block."""
    return [_DAMPING ** float(count - 1 - index) for index in range(count)]


class ModedControlNets(MultiControlNetModel):
    def __init__(self, nets: Sequence[ControlNetModel], modes: Sequence[str], *, guided: bool) -> None:
        super().__init__(list(nets))
        self.modes = list(modes)
        self.guided = guided  # the batch holds an unconditional half, then a conditional one

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: list[torch.Tensor],
        conditioning_scale: list[float],
        guess_mode: bool = False,
        return_dict: bool = True,
        **others: Any,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        down_total: list[torch.Tensor] | None = None
        mid_total: torch.Tensor | None = None
        for image, scale, net, mode in zip(controlnet_cond, conditioning_scale, self.nets, self.modes, strict=True):
            down, mid = net(sample, timestep, encoder_hidden_states, controlnet_cond=image, conditioning_scale=scale,
                            guess_mode=False, return_dict=False, **others)
            residuals = [*down, mid]
            if mode != "balanced":
                weights = soft_weights(len(residuals))
                residuals = [residual * weight for residual, weight in zip(residuals, weights, strict=True)]
            if mode == "controlnet" and self.guided:
                residuals = [_conditional_half(residual) for residual in residuals]
            if down_total is None or mid_total is None:
                down_total, mid_total = residuals[:-1], residuals[-1]
            else:
                down_total = [total + residual for total, residual in zip(down_total, residuals[:-1], strict=True)]
                mid_total = mid_total + residuals[-1]
        assert down_total is not None and mid_total is not None
        return down_total, mid_total


def _conditional_half(residual: torch.Tensor) -> torch.Tensor:
    half = residual.shape[0] // 2
    return torch.cat([torch.zeros_like(residual[:half]), residual[half:]])
