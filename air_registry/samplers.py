"""Samplers: the ``scheduler`` names that clients send, mapped to the diffusers class and options
that implement them.

diffusers calls a sampler a "scheduler", as the wire protocol does; inside this server "scheduler"
is kept for nothing else, and the queue in front of the device is the device queue.

Pure data: this module names diffusers classes as strings and imports no diffusers, so the task
layer can validate ``scheduler`` before anything reaches the device worker. The worker turns a spec
into an object with ``PipelineCache.make_sampler``.

Names follow Runware's list for Stable Diffusion models (friendly names such as ``DPM++ 2M Karras``
and diffusers class names such as ``EulerDiscreteScheduler``). Left out on purpose: the inverse
schedulers (``DDIMInverseScheduler``, ``DPMSolverMultistepInverse``: they run the diffusion
backwards, for inversion, and give no image), the EDM and variance-exploding schedulers
(``EDMEulerScheduler``, ``KarrasVeScheduler``, ``ScoreSdeVeScheduler``: they expect models trained
in another parameterisation than any served here), ``IPNDMScheduler`` (it cannot add noise to an
image, so image-to-image fails with it) and the ``Uniform`` variants, whose meaning Runware does not
define.

A sampler integrates the kind of prediction its model was trained to make, so each one fits one
kind of model, its **sampling** (``DIFFUSION``: noise-prediction models, Stable Diffusion 1.x, 2.x
and XL; ``FLOW``: flow-matching models, FLUX and Stable Diffusion 3). Every architecture names its
sampling (``architectures.py``), and a name is resolved for that sampling: ``Euler`` on FLUX is
flow-matching Euler, on SD 1.5 the classic one. A sampler of the other kind is refused, naming the
samplers that fit. For flow-matching models only the flow-matching Euler sampler and its sigma
schedules are offered: the multistep solvers' flow modes neither take FLUX's dynamically shifted
schedule everywhere nor add noise to a seed image, so image-to-image would fail with them.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imagewire.air_registry.errors import SamplerUnusable, UnknownSampler, shown

DEFAULT_NAME = "Default"

# The kinds of model a sampler can fit (see the module's docstring).
DIFFUSION = "diffusion"
FLOW = "flow"
SAMPLINGS: Mapping[str, str] = types.MappingProxyType({
    DIFFUSION: "diffusion models (Stable Diffusion 1.x, 2.x, XL)",
    FLOW: "flow-matching models (FLUX, Stable Diffusion 3)",
})


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    class_name: str
    # Overrides applied on top of the model's own scheduler config. Not part of the hash: a
    # mapping is not hashable, and name + class_name + sampling already identify a spec.
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    sampling: str = DIFFUSION


# The noise-schedule flags are spelled out for every friendly name, so that "Euler" means plain
# Euler even on a model whose own config turns Karras sigmas on.
_PLAIN: Mapping[str, Any] = types.MappingProxyType(
    {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
)
_KARRAS: Mapping[str, Any] = types.MappingProxyType({**_PLAIN, "use_karras_sigmas": True})
_EXPONENTIAL: Mapping[str, Any] = types.MappingProxyType({**_PLAIN, "use_exponential_sigmas": True})
_BETA: Mapping[str, Any] = types.MappingProxyType({**_PLAIN, "use_beta_sigmas": True})

_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_3M = {"algorithm_type": "dpmsolver++", "solver_order": 3}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
# Singlestep needs a lower-order last step when it ends on sigma zero; diffusers would switch it on
# anyway, with a warning on every call.
_DPMPP_SINGLE = {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True}


def _spec(name: str, class_name: str, *option_sets: Mapping[str, Any], sampling: str = DIFFUSION) -> SamplerSpec:
    options: dict[str, Any] = {}
    for option_set in option_sets:
        options.update(option_set)
    return SamplerSpec(name=name, class_name=class_name, options=types.MappingProxyType(options), sampling=sampling)


def _sigma_variants(
    name: str, class_name: str, base: Mapping[str, Any], *, beta_and_exponential: bool = True
) -> list[SamplerSpec]:
    """``name``, ``name Karras`` and, where Runware lists them, ``name Beta``/``name Exponential``."""
    variants = [_spec(name, class_name, base, _PLAIN), _spec(f"{name} Karras", class_name, base, _KARRAS)]
    if beta_and_exponential:
        variants.append(_spec(f"{name} Beta", class_name, base, _BETA))
        variants.append(_spec(f"{name} Exponential", class_name, base, _EXPONENTIAL))
    return variants


_FRIENDLY_SPECS: list[SamplerSpec] = [
    _spec("DDIM", "DDIMScheduler"),
    _spec("DDPM", "DDPMScheduler"),
    _spec("PNDM", "PNDMScheduler"),
    _spec("Euler a", "EulerAncestralDiscreteScheduler"),
    _spec("LCM", "LCMScheduler"),
    _spec("TCD", "TCDScheduler"),
    _spec("DEIS", "DEISMultistepScheduler", _PLAIN),
    _spec("DPM2", "KDPM2DiscreteScheduler", _PLAIN),
    _spec("DPM2 Karras", "KDPM2DiscreteScheduler", _KARRAS),
    _spec("DPM2 a", "KDPM2AncestralDiscreteScheduler", _PLAIN),
    _spec("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", _KARRAS),
    *_sigma_variants("Euler", "EulerDiscreteScheduler", {}),
    *_sigma_variants("Heun", "HeunDiscreteScheduler", {}, beta_and_exponential=False),
    *_sigma_variants("LMS", "LMSDiscreteScheduler", {}, beta_and_exponential=False),
    *_sigma_variants("DPM++", "DPMSolverSinglestepScheduler", _DPMPP_SINGLE),
    *_sigma_variants("DPM++ 2M", "DPMSolverMultistepScheduler", _DPMPP_2M),
    *_sigma_variants("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _DPMPP_2M_SDE),
    *_sigma_variants("DPM++ 3M", "DPMSolverMultistepScheduler", _DPMPP_3M),
    *_sigma_variants("DPM++ SDE", "DPMSolverSDEScheduler", {}),
    _spec("UniPC", "UniPCMultistepScheduler", _PLAIN),
    _spec("UniPC Karras", "UniPCMultistepScheduler", _KARRAS),
    _spec("UniPC 2M", "UniPCMultistepScheduler", {"solver_order": 2}, _PLAIN),
    _spec("UniPC 2M Karras", "UniPCMultistepScheduler", {"solver_order": 2}, _KARRAS),
    _spec("UniPC 3M", "UniPCMultistepScheduler", {"solver_order": 3}, _PLAIN),
    _spec("UniPC 3M Karras", "UniPCMultistepScheduler", {"solver_order": 3}, _KARRAS),
]

# A class name keeps the model's own settings for that class (Karras sigmas and so on): the client
# asked for the class, not for a particular recipe.
_CLASS_NAMES: tuple[str, ...] = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
    "TCDScheduler",
)

SAMPLERS: Mapping[str, SamplerSpec] = types.MappingProxyType(
    {spec.name: spec for spec in _FRIENDLY_SPECS}
    | {class_name: _spec(class_name, class_name) for class_name in _CLASS_NAMES}
)

# Every name a client may send, in their canonical spelling, for ``allowedValues``.
SAMPLER_NAMES: tuple[str, ...] = tuple(sorted([DEFAULT_NAME, *SAMPLERS], key=str.casefold))


def _normalise(name: str) -> str:
    # Case and runs of spaces carry no meaning in these names ("euler  A" is "Euler a").
    return " ".join(name.split()).casefold()


# Flow-matching models: Runware's names for FLUX that flow-matching Euler implements, with the sigma
# schedules it offers, and the class name itself.
_FLOW_EULER = "FlowMatchEulerDiscreteScheduler"
_FLOW_FRIENDLY_SPECS: list[SamplerSpec] = [
    _spec("FlowMatch Euler", _FLOW_EULER, _PLAIN, sampling=FLOW),
    _spec("Euler", _FLOW_EULER, _PLAIN, sampling=FLOW),
    _spec("Euler Karras", _FLOW_EULER, _KARRAS, sampling=FLOW),
    _spec("Euler Beta", _FLOW_EULER, _BETA, sampling=FLOW),
    _spec("Euler Exponential", _FLOW_EULER, _EXPONENTIAL, sampling=FLOW),
]
FLOW_SAMPLERS: Mapping[str, SamplerSpec] = types.MappingProxyType(
    {spec.name: spec for spec in _FLOW_FRIENDLY_SPECS}
    | {_FLOW_EULER: _spec(_FLOW_EULER, _FLOW_EULER, sampling=FLOW)}
)

# Every sampler, per sampling; and every name a client may send for each, for ``allowedValues``.
SAMPLERS_BY_SAMPLING: Mapping[str, Mapping[str, SamplerSpec]] = types.MappingProxyType(
    {DIFFUSION: SAMPLERS, FLOW: FLOW_SAMPLERS})
NAMES_BY_SAMPLING: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    DIFFUSION: SAMPLER_NAMES,
    FLOW: tuple(sorted([DEFAULT_NAME, *FLOW_SAMPLERS], key=str.casefold)),
})
_FRIENDLY_BY_SAMPLING: Mapping[str, list[SamplerSpec]] = {DIFFUSION: _FRIENDLY_SPECS, FLOW: _FLOW_FRIENDLY_SPECS}

_BY_NORMALISED_NAME: Mapping[str, Mapping[str, SamplerSpec]] = types.MappingProxyType({
    sampling: types.MappingProxyType({_normalise(name): spec for name, spec in specs.items()})
    for sampling, specs in SAMPLERS_BY_SAMPLING.items()
})


def resolve_sampler(name: str | None, sampling: str = DIFFUSION) -> SamplerSpec | None:
    """The spec for a client's scheduler name on a model of ``sampling``; ``None`` (absent or
    ``Default``) means the model's own. A sampler of another sampling raises SamplerUnusable."""
    if name is None:
        return None
    key = _normalise(name) if isinstance(name, str) else None
    if key == _normalise(DEFAULT_NAME):
        return None
    spec = _BY_NORMALISED_NAME[sampling].get(key) if key is not None else None
    if spec is not None:
        return spec
    allowed = NAMES_BY_SAMPLING[sampling]
    friendly = [DEFAULT_NAME, *(spec.name for spec in _FRIENDLY_BY_SAMPLING[sampling])]
    example = "EulerDiscreteScheduler" if sampling == DIFFUSION else _FLOW_EULER
    choices = f"one of {', '.join(friendly)} or a diffusers scheduler class name such as {example}"
    for other, specs in _BY_NORMALISED_NAME.items():
        misfit = specs.get(key) if key is not None and other != sampling else None
        if misfit is not None:
            raise SamplerUnusable(
                f"{misfit.name} runs here only on {SAMPLINGS[other]}; this model is one of the "
                f"{SAMPLINGS[sampling]}: use {choices}", allowed_values=list(allowed))
    raise UnknownSampler(f"must be {choices} (case-insensitive); received {shown(name)}",
                         allowed_values=list(allowed))
