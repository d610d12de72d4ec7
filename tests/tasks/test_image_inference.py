"""imageInference's checks before the device: they run once, in ``prepare``, with no I/O."""

from __future__ import annotations

import pytest

from imagewire.tasks import image_inference, schema
from imagewire.tasks.errors import InvalidParameter, MissingParameter, UnsupportedParameter
from tests.contexts import pure_context
from tests.wire import new_uuid


def task(**fields: object) -> schema.ImageInference:
    base: dict[str, object] = {"taskUUID": new_uuid(), "model": "imagewire:tiny@1", "positivePrompt": "a fox",
                               "width": 128, "height": 128}
    base.update(fields)
    return schema.ImageInference(**base)  # type: ignore[arg-type]


def test_a_refiner_without_a_seed_image_is_refused_before_the_device() -> None:
    with pytest.raises(InvalidParameter) as caught:
        image_inference.prepare(task(model="sdxl-refiner-1.0"), pure_context())
    assert caught.value.parameter == "seedImage"
    assert "only does image-to-image" in caught.value.message


def test_a_sampler_the_device_cannot_run_is_refused_naming_why() -> None:
    context = pure_context(unavailable_samplers={"DPM++ SDE": "needs torchsde, which is not installed"})
    with pytest.raises(InvalidParameter) as caught:
        image_inference.prepare(task(scheduler="dpm++ sde"), context)
    assert caught.value.parameter == "scheduler"
    assert caught.value.message == ("scheduler DPM++ SDE needs torchsde, which is not installed; "
                                    "choose another scheduler")
    assert image_inference.prepare(task(scheduler="Euler a"), context).sampler is not None


def test_samplers_are_resolved_for_the_models_kind_before_the_device() -> None:
    flux = image_inference.prepare(task(model="runware:101@1", scheduler="Euler Karras"), pure_context())
    assert flux.sampler is not None and flux.sampler.class_name == "FlowMatchEulerDiscreteScheduler"
    sd = image_inference.prepare(task(model="imagewire:sd15@1", scheduler="Euler Karras"), pure_context())
    assert sd.sampler is not None and sd.sampler.class_name == "EulerDiscreteScheduler"
    for model, scheduler in [("imagewire:sd15@1", "FlowMatchEulerDiscreteScheduler"),
                             ("imagewire:tiny-sd3@1", "DPM++ 2M Karras")]:
        with pytest.raises(InvalidParameter) as caught:
            image_inference.prepare(task(model=model, scheduler=scheduler), pure_context())
        assert caught.value.parameter == "scheduler"
        assert caught.value.message.startswith(f"scheduler {scheduler} runs here only on ")


def test_flow_models_default_to_their_architectures_values() -> None:
    schnell = image_inference.prepare(task(model="runware:100@1"), pure_context())
    dev = image_inference.prepare(task(model="flux-dev"), pure_context())
    assert (schnell.steps, schnell.cfg_scale, schnell.sampler) == (4, 0.0, None)
    assert (dev.steps, dev.cfg_scale) == (28, 3.5)


def test_flux_fill_only_repaints_and_takes_a_mask() -> None:
    with pytest.raises(MissingParameter) as caught:
        image_inference.prepare(task(model="runware:102@1", seedImage="an image"), pure_context())
    assert caught.value.parameter == "maskImage"
    assert "runware:102@1 is an inpainting model" in caught.value.message
    prepared = image_inference.prepare(task(model="runware:102@1", seedImage="an image", maskImage="a mask"),
                                       pure_context())
    assert isinstance(prepared, image_inference.Prepared) and prepared.edits.mask == "a mask"


@pytest.mark.parametrize("model", ["runware:101@1", "runware:100@1", "imagewire:sd35-large@1", "tiny-flux"])
def test_flux_and_sd3_take_masks(model: str) -> None:
    for edit in ({"maskImage": "a mask"}, {"outpaint": schema.Outpaint(left=64)}):
        prepared = image_inference.prepare(task(model=model, seedImage="an image", **edit), pure_context())
        assert isinstance(prepared, image_inference.Prepared) and prepared.edits.repaints


@pytest.mark.parametrize("edit", [{"maskImage": "a mask"}, {"outpaint": schema.Outpaint(left=64)}])
def test_a_mask_on_flux_kontext_is_refused_naming_the_parameter_and_who_can(edit: dict[str, object]) -> None:
    (name,) = edit
    with pytest.raises(UnsupportedParameter) as caught:
        image_inference.prepare(task(model="runware:106@1", seedImage="an image", **edit), pure_context())
    assert caught.value.code == "unsupportedParameter" and caught.value.parameter == name
    assert caught.value.message.startswith(f"{name} is not supported by model runware:106@1 (flux1-kontext)")
    assert "flux1-dev" in caught.value.message and "sd15-inpaint" in caught.value.message


@pytest.mark.parametrize("model", ["runware:101@1", "runware:102@1", "runware:106@1", "runware:5@1",
                                   "imagewire:tiny-sd3@1"])
def test_controlnet_on_a_flow_matching_model_is_refused_before_the_device(model: str) -> None:
    controls = [schema.ControlNet(model="imagewire:sd15-controlnet-canny@1", guideImage="a guide")]
    edit = {"seedImage": "an image", "maskImage": "a mask"} if model == "runware:102@1" else {}
    with pytest.raises(UnsupportedParameter) as caught:
        image_inference.prepare(task(model=model, controlNet=controls, **edit), pure_context())
    assert caught.value.parameter == "controlNet[0].model"
    assert "Architectures that take ControlNets: tiny, sd15, sd21, sdxl" in caught.value.message
    assert "flux" not in caught.value.message.split("take ControlNets:")[1]


def test_prepare_reaches_for_no_service_but_the_catalog() -> None:
    # pure_context's store, fetcher and device fail the test if touched.
    prepared = image_inference.prepare(task(seedImage="not even an image", numberResults=3, seed=7), pure_context())
    assert prepared.seeds == [7, 8, 9]


def test_catalog_defaults_are_held_to_the_wire_limits() -> None:
    tiny = pure_context().services.catalog.resolve("tiny")
    image_inference.check_model_defaults(tiny.defaults)
    with pytest.raises(ValueError, match="defaults.steps must be an integer from 1 to 100, not 101"):
        image_inference.check_model_defaults(type(tiny.defaults)(**{**vars(tiny.defaults), "steps": 101}))


def test_a_model_that_is_not_a_checkpoint_is_refused_naming_the_checkpoints() -> None:
    with pytest.raises(InvalidParameter) as caught:
        image_inference.prepare(task(model="tiny-lora"), pure_context())
    error = caught.value
    assert error.parameter == "model"
    assert error.message.startswith("model must name a checkpoint; imagewire:tiny-lora@1 is a LoRA. Checkpoints here: ")
    assert error.allowed_values is not None and "imagewire:tiny@1" in error.allowed_values
    assert "imagewire:tiny-lora@1" not in error.allowed_values


def test_the_content_checks_are_the_tasks_not_its_edits() -> None:
    plain = image_inference.prepare(task(), pure_context())
    assert isinstance(plain, image_inference.Prepared) and not plain.safety.active
    checked = image_inference.prepare(task(checkNSFW=True, seedImage="an image", maskImage="a mask"), pure_context())
    assert isinstance(checked, image_inference.Prepared)
    assert (checked.safety.check_content, checked.safety.parameter) == (True, "checkNSFW")
    assert checked.edits.mask == "a mask"
