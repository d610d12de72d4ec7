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
