from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from imagewire.air_registry.catalog import ModelEntry
from imagewire.air_registry.errors import SamplerUnusable, UnknownSampler
from imagewire.air_registry.samplers import (
    DIFFUSION,
    FLOW,
    FLOW_SAMPLERS,
    NAMES_BY_SAMPLING,
    SAMPLER_NAMES,
    SAMPLERS,
    SamplerSpec,
    resolve_sampler,
)
from imagewire.tasks.inputs import task_error

if TYPE_CHECKING:
    from imagewire.air_registry.loader import PipelineCache

# The names Runware documents for Stable Diffusion models that this server must accept, and the
# diffusers class each stands for.
RUNWARE_NAMES = {
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "Euler Karras": "EulerDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "Heun Karras": "HeunDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "DDPM": "DDPMScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DPM++ 2M Karras": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE Karras": "DPMSolverMultistepScheduler",
    "DPM++ 3M Karras": "DPMSolverMultistepScheduler",
    "DPM++ SDE": "DPMSolverSDEScheduler",
    "DPM++ SDE Karras": "DPMSolverSDEScheduler",
    "DPM++ Karras": "DPMSolverSinglestepScheduler",
    "DPM2": "KDPM2DiscreteScheduler",
    "DPM2 a": "KDPM2AncestralDiscreteScheduler",
    "DPM2 Karras": "KDPM2DiscreteScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "UniPC 3M Karras": "UniPCMultistepScheduler",
    "LMS": "LMSDiscreteScheduler",
    "LMS Karras": "LMSDiscreteScheduler",
    "PNDM": "PNDMScheduler",
    "LCM": "LCMScheduler",
    "DEIS": "DEISMultistepScheduler",
    "TCD": "TCDScheduler",
}

CLASS_NAMES = sorted(set(RUNWARE_NAMES.values()))

# diffusers' sigma schedules turn torch tensors into numpy arrays in a way numpy 2 deprecates; it is
# theirs to fix, and thousands of copies would bury any warning of ours.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
]


def config_of(scheduler: Any) -> Any:
    # Scheduler classes get ``config`` from a mixin that type checkers do not see through.
    return scheduler.config


# ---------------------------------------------------------------- names → specs


@pytest.mark.parametrize(("name", "class_name"), sorted(RUNWARE_NAMES.items()))
def test_every_runware_name_resolves(name: str, class_name: str) -> None:
    spec = resolve_sampler(name)
    assert spec is not None
    assert spec.name == name
    assert spec.class_name == class_name


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_diffusers_class_names_resolve_to_that_class_without_overrides(class_name: str) -> None:
    spec = resolve_sampler(class_name)
    assert spec == SamplerSpec(name=class_name, class_name=class_name, options={})


@pytest.mark.parametrize("name", [None, "Default", "default", "  DEFAULT "])
def test_default_means_the_models_own_scheduler(name: str | None) -> None:
    assert resolve_sampler(name) is None


@pytest.mark.parametrize(
    ("sent", "canonical"),
    [
        ("euler a", "Euler a"),
        ("EULER A", "Euler a"),
        ("  Euler a  ", "Euler a"),
        ("dpm++ 2m   karras", "DPM++ 2M Karras"),
        ("eulerdiscretescheduler", "EulerDiscreteScheduler"),
        ("unipc", "UniPC"),
    ],
)
def test_matching_ignores_case_and_spacing(sent: str, canonical: str) -> None:
    spec = resolve_sampler(sent)
    assert spec is not None
    assert spec.name == canonical


def test_karras_variants_set_karras_sigmas_and_plain_ones_clear_them() -> None:
    karras = resolve_sampler("DPM++ 2M Karras")
    plain = resolve_sampler("DPM++ 2M")
    sde = resolve_sampler("DPM++ 2M SDE Karras")
    assert karras is not None and plain is not None and sde is not None
    assert karras.options["use_karras_sigmas"] is True
    assert plain.options["use_karras_sigmas"] is False
    assert karras.options["algorithm_type"] == plain.options["algorithm_type"] == "dpmsolver++"
    assert sde.options["algorithm_type"] == "sde-dpmsolver++"


@pytest.mark.parametrize("name", ["Warp", "Euler b", "", "DDIMInverseScheduler", "KarrasVeScheduler"])
def test_unknown_names_are_rejected_with_the_allowed_values(name: str) -> None:
    with pytest.raises(UnknownSampler) as caught:
        resolve_sampler(name)
    error = task_error(caught.value, "scheduler")
    assert error.code == "invalidParameter"
    assert error.parameter == "scheduler"
    assert error.type == "string"
    assert error.allowed_values == list(SAMPLER_NAMES)
    assert f"received {name!r}" in error.message
    assert "Euler a" in error.message and "DPM++ 2M Karras" in error.message


# Runware's names for FLUX that flow-matching Euler implements.
RUNWARE_FLOW_NAMES = ["FlowMatchEulerDiscreteScheduler", "Euler", "Euler Beta", "Euler Exponential", "Euler Karras"]


@pytest.mark.parametrize("name", RUNWARE_FLOW_NAMES)
def test_flow_names_resolve_to_flow_matching_euler_on_flow_models(name: str) -> None:
    spec = resolve_sampler(name.upper(), FLOW)
    assert spec is not None and spec.name == name and spec.sampling == FLOW
    assert spec.class_name == "FlowMatchEulerDiscreteScheduler"


def test_a_name_both_kinds_know_means_each_kinds_own_sampler() -> None:
    diffusion, flow = resolve_sampler("Euler Karras", DIFFUSION), resolve_sampler("Euler Karras", FLOW)
    assert diffusion is not None and flow is not None
    assert diffusion.class_name == "EulerDiscreteScheduler" and flow.class_name == "FlowMatchEulerDiscreteScheduler"
    assert diffusion.options["use_karras_sigmas"] is flow.options["use_karras_sigmas"] is True
    assert diffusion != flow
    assert resolve_sampler("Default", FLOW) is None


@pytest.mark.parametrize(
    ("name", "sampling", "kind", "other"),
    [
        ("FlowMatchEulerDiscreteScheduler", DIFFUSION, "flow-matching models (FLUX", "diffusion models"),
        ("flowmatch euler", DIFFUSION, "flow-matching models (FLUX", "diffusion models"),
        ("DPM++ 2M Karras", FLOW, "diffusion models (Stable Diffusion 1.x", "flow-matching models"),
        ("DDIMScheduler", FLOW, "diffusion models (Stable Diffusion 1.x", "flow-matching models"),
    ],
)
def test_a_sampler_of_the_other_kind_is_refused_naming_those_that_fit(
    name: str, sampling: str, kind: str, other: str
) -> None:
    with pytest.raises(SamplerUnusable) as caught:
        resolve_sampler(name, sampling)
    error = task_error(caught.value, "scheduler")
    assert error.code == "invalidParameter" and error.parameter == "scheduler"
    assert error.allowed_values == list(NAMES_BY_SAMPLING[sampling])
    assert f"runs here only on {kind}" in error.message
    assert f"this model is one of the {other}" in error.message


def test_unknown_names_on_flow_models_list_the_flow_samplers() -> None:
    with pytest.raises(UnknownSampler) as caught:
        resolve_sampler("Warp", FLOW)
    assert caught.value.allowed_values == list(NAMES_BY_SAMPLING[FLOW]) == sorted(
        ["Default", *FLOW_SAMPLERS], key=str.casefold)
    assert "FlowMatchEulerDiscreteScheduler" in caught.value.problem


def test_allowed_values_are_sorted_and_complete() -> None:
    assert list(SAMPLER_NAMES) == sorted(SAMPLER_NAMES, key=str.casefold)
    assert set(SAMPLER_NAMES) == {"Default", *SAMPLERS}
    assert set(RUNWARE_NAMES) <= set(SAMPLER_NAMES)
    assert set(CLASS_NAMES) <= set(SAMPLER_NAMES)


def test_every_spec_names_a_diffusers_class() -> None:
    import diffusers

    for spec in [*SAMPLERS.values(), *FLOW_SAMPLERS.values()]:
        assert hasattr(diffusers, spec.class_name), spec


def test_specs_are_immutable_and_hashable() -> None:
    spec = resolve_sampler("Euler Karras")
    assert spec is not None
    with pytest.raises(TypeError):
        spec.options["use_karras_sigmas"] = False  # type: ignore[index]
    assert len({spec, resolve_sampler("Euler Karras")}) == 1


# ---------------------------------------------------------------- specs → scheduler objects


@pytest.fixture(scope="module")
def tiny_pipe(pipelines: PipelineCache, tiny_entry: ModelEntry) -> Any:
    return pipelines.text_to_image(tiny_entry)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_make_scheduler_builds_the_spec(pipelines: PipelineCache, tiny_pipe: Any, name: str) -> None:
    spec = SAMPLERS[name]
    first = pipelines.make_sampler(tiny_pipe, spec)
    second = pipelines.make_sampler(tiny_pipe, spec)
    assert type(first).__name__ == spec.class_name
    assert first is not second
    for option, value in spec.options.items():
        assert config_of(first)[option] == value, option
    # The model's noise schedule carries over to every scheduler.
    assert config_of(first)["beta_schedule"] == "scaled_linear"
    assert config_of(first)["beta_start"] == 0.00085


def test_default_gives_a_fresh_copy_of_the_models_scheduler(pipelines: PipelineCache, tiny_pipe: Any) -> None:
    first = pipelines.make_sampler(tiny_pipe, None)
    second = pipelines.make_sampler(tiny_pipe, None)
    assert type(first).__name__ == "PNDMScheduler"
    assert first is not second
    assert first is not tiny_pipe.scheduler


def test_schedulers_start_from_the_models_config_not_the_last_one_used(
    pipelines: PipelineCache, tiny_entry: ModelEntry
) -> None:
    pipe: Any = pipelines.image_to_image(tiny_entry)
    original = pipe.scheduler
    try:
        pipe.scheduler = pipelines.make_sampler(pipe, resolve_sampler("DPM++ 3M Karras"))
        assert type(pipelines.make_sampler(pipe, None)).__name__ == "PNDMScheduler"
        euler = pipelines.make_sampler(pipe, resolve_sampler("EulerDiscreteScheduler"))
        assert config_of(euler)["use_karras_sigmas"] is False
        assert "solver_order" not in config_of(euler)
    finally:
        pipe.scheduler = original


def test_seeds_make_the_sde_scheduler_repeatable(pipelines: PipelineCache, tiny_entry: ModelEntry) -> None:
    import numpy as np
    import torch

    pipe: Any = pipelines.text_to_image(tiny_entry)
    spec = resolve_sampler("DPM++ SDE Karras")
    assert config_of(pipelines.make_sampler(pipe, spec, seeds=[7]))["noise_sampler_seed"] == 7
    assert config_of(pipelines.make_sampler(pipe, spec, seeds=[7, 8]))["noise_sampler_seed"] == [7, 8]
    # Schedulers that take their noise from the pipeline's generator are left as they are.
    euler_a = pipelines.make_sampler(pipe, resolve_sampler("Euler a"), seeds=[7])
    assert "noise_sampler_seed" not in config_of(euler_a)

    def generate(seed: int) -> Any:
        pipe.scheduler = pipelines.make_sampler(pipe, spec, seeds=[seed])
        output = pipe(
            "a lighthouse",
            width=128,
            height=128,
            num_inference_steps=3,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        return np.asarray(output.images[0])

    original = pipe.scheduler
    try:
        assert np.array_equal(generate(3), generate(3))
    finally:
        pipe.scheduler = original


def test_samplers_this_diffusers_lacks_are_found_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from imagewire.air_registry import loader

    assert loader.unavailable_samplers() == {}  # every sampler of the table runs on this installation
    missing = SamplerSpec(name="Warp", class_name="WarpDriveScheduler")
    monkeypatch.setattr(loader, "SAMPLERS", {**SAMPLERS, "Warp": missing})
    assert list(loader.unavailable_samplers()) == ["Warp"]
    assert "is not available in this server's diffusers" in loader.unavailable_samplers()["Warp"]
