"""imageInference's checks before the device: they run once, in ``prepare``, with no I/O."""

from __future__ import annotations

import pytest

from imagewire.tasks import image_inference, schema
from imagewire.tasks.errors import InvalidParameter
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


def test_flux_fill_is_refused_before_the_device_until_masks_are_taken() -> None:
    with pytest.raises(InvalidParameter) as caught:
        image_inference.prepare(task(model="runware:102@1", seedImage="an image"), pure_context())
    assert caught.value.parameter == "model"
    assert caught.value.message == ("model FLUX.1 Fill [dev] (runware:102@1) only does inpainting: it needs a "
                                    "seedImage and a maskImage, and this server takes no maskImage yet")


def test_prepare_reaches_for_no_service_but_the_catalog() -> None:
    # pure_context's store, fetcher and device fail the test if touched.
    prepared = image_inference.prepare(task(seedImage="not even an image", numberResults=3, seed=7), pure_context())
    assert prepared.seeds == [7, 8, 9]


def test_catalog_defaults_are_held_to_the_wire_limits() -> None:
    tiny = pure_context().services.catalog.resolve("tiny")
    image_inference.check_model_defaults(tiny.defaults)
    with pytest.raises(ValueError, match="defaults.steps must be an integer from 1 to 100, not 101"):
        image_inference.check_model_defaults(type(tiny.defaults)(**{**vars(tiny.defaults), "steps": 101}))
