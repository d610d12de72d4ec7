"""``acceleration`` and ``acceleratorOptions`` before the device: which cache a task gets, presets overridden field
by field, and errors that name the option, its allowed values and what was sent."""

from __future__ import annotations

import uuid

import orjson
import pytest

from imagewire.server import protocol
from imagewire.tasks import acceleration, image_inference, schema
from imagewire.tasks.acceleration import CacheSettings
from imagewire.tasks.errors import InvalidParameter, TaskError, UnsupportedParameter
from tests.contexts import pure_context
from tests.wire import new_uuid

UNET_MODELS = ["imagewire:tiny@1", "imagewire:tiny-sdxl@1", "imagewire:sd15@1"]
TRANSFORMER_MODELS = ["imagewire:tiny-flux@1", "imagewire:tiny-sd3@1", "runware:101@1", "runware:106@1"]


def cache(model: str = "imagewire:tiny@1", steps: int = 20, **fields: object) -> CacheSettings | None:
    options = fields.pop("options", None)
    task = schema.ImageInference(
        taskUUID=new_uuid(), model=model, positivePrompt="a fox", width=128, height=128, steps=steps,
        acceleratorOptions=schema.AcceleratorOptions(**options) if options is not None else None,  # type: ignore[arg-type]
        **fields)  # type: ignore[arg-type]
    prepared = image_inference.prepare(task, pure_context())
    assert isinstance(prepared, image_inference.Prepared)
    return prepared.cache


def refused(model: str = "imagewire:tiny@1", steps: int = 20, **fields: object) -> TaskError:
    with pytest.raises(TaskError) as caught:
        cache(model, steps, **fields)
    return caught.value


def test_no_options_and_preset_none_cache_nothing() -> None:
    assert cache() is None
    assert cache(acceleration="none") is None
    assert cache("imagewire:tiny-flux@1", acceleration="none") is None


def test_deep_cache_takes_the_documented_defaults() -> None:
    assert cache(options={"deepCache": True}) == CacheSettings(
        kind="deepCache", start=0, end=20, max_consecutive=3, interval=3, branch=0)


def test_tea_cache_distance_sets_the_threshold() -> None:
    default = cache("imagewire:tiny-flux@1", options={"teaCache": True})
    assert default is not None and (default.kind, default.threshold) == ("teaCache", 0.125)
    aggressive = cache("imagewire:tiny-flux@1", options={"teaCache": True, "teaCacheDistance": 1.0})
    conservative = cache("imagewire:tiny-flux@1", options={"teaCache": True, "teaCacheDistance": 0.0})
    assert aggressive is not None and conservative is not None
    assert (conservative.threshold, aggressive.threshold) == (0.0, acceleration.MAX_THRESHOLD)


def test_step_window_in_steps_or_percentages() -> None:
    assert cache(options={"deepCache": True, "cacheStartStep": 2, "cacheEndStep": 15,
                          "cacheMaxConsecutiveSteps": 5}) == CacheSettings(
        kind="deepCache", start=2, end=15, max_consecutive=5, interval=3, branch=0)
    # 10 % of 25 steps is 2.5: the start rounds down, the end (90 %: 22.5) up.
    by_share = cache(steps=25, options={"deepCache": True, "cacheStartStepPercentage": 10,
                                        "cacheEndStepPercentage": 90})
    assert by_share is not None and (by_share.start, by_share.end) == (2, 23)


@pytest.mark.parametrize("model", UNET_MODELS)
def test_tea_cache_on_a_unet_model_names_the_option_and_the_families_it_fits(model: str) -> None:
    for options, name in [({"teaCache": True}, "teaCache"), ({"teaCacheDistance": 0.4}, "teaCacheDistance")]:
        error = refused(model, options=options)
        assert isinstance(error, UnsupportedParameter)
        assert error.parameter == f"acceleratorOptions.{name}"
        assert "transformer models (FLUX, SD 3)" in error.message and model in error.message


@pytest.mark.parametrize("model", TRANSFORMER_MODELS)
def test_deep_cache_on_a_transformer_model_names_the_option_and_the_families_it_fits(model: str) -> None:
    for options, name in [({"deepCache": True}, "deepCache"), ({"deepCacheInterval": 2}, "deepCacheInterval"),
                          ({"deepCacheBranchId": 1}, "deepCacheBranchId")]:
        error = refused(model, options=options)
        assert isinstance(error, UnsupportedParameter)
        assert error.parameter == f"acceleratorOptions.{name}"
        assert "UNet models (SD 1.x, SD 2.x, SDXL)" in error.message


def test_a_cache_window_past_the_steps_names_the_option_its_range_and_the_value() -> None:
    error = refused(steps=20, options={"deepCache": True, "cacheEndStep": 30})
    assert isinstance(error, InvalidParameter) and error.parameter == "acceleratorOptions.cacheEndStep"
    assert "1 to 20" in error.message and "received 30" in error.message
    error = refused(steps=20, options={"deepCache": True, "cacheStartStep": 10, "cacheEndStep": 10})
    assert error.parameter == "acceleratorOptions.cacheEndStep"
    assert "11 to 20" in error.message and "received 10" in error.message
    error = refused(steps=8, options={"deepCache": True, "cacheStartStep": 8})
    assert error.parameter == "acceleratorOptions.cacheStartStep" and "0 to 7" in error.message
    error = refused(steps=20, options={"deepCache": True, "cacheStartStepPercentage": 50,
                                       "cacheEndStepPercentage": 50})
    assert error.parameter == "acceleratorOptions.cacheEndStepPercentage"


def test_a_step_and_its_percentage_are_alternatives() -> None:
    error = refused(options={"deepCache": True, "cacheEndStep": 10, "cacheEndStepPercentage": 50})
    assert error.parameter == "acceleratorOptions.cacheEndStep" and "alternatives" in error.message


def test_an_option_no_cache_reads_is_refused_not_ignored() -> None:
    for options in ({"cacheEndStep": 10}, {"deepCache": False, "deepCacheInterval": 2}):
        error = refused(options=options)
        assert isinstance(error, InvalidParameter)
        assert error.parameter == f"acceleratorOptions.{list(options)[-1]}"
    error = refused("imagewire:tiny-flux@1", options={"teaCacheDistance": 0.4})
    assert error.parameter == "acceleratorOptions.teaCacheDistance"


@pytest.mark.parametrize("preset", ["low", "medium", "high"])
def test_presets_pick_the_cache_that_fits_the_model(preset: str) -> None:
    unet, transformer = cache(acceleration=preset), cache("imagewire:tiny-sd3@1", acceleration=preset)
    assert unet is not None and unet.kind == "deepCache"
    assert transformer is not None and transformer.kind == "teaCache"
    assert unet.interval == acceleration.PRESETS[preset]["unet"]["deepCacheInterval"]


def test_presets_grow_more_aggressive() -> None:
    unets = [cache(acceleration=preset) for preset in ("low", "medium", "high")]
    transformers = [cache("imagewire:tiny-flux@1", acceleration=preset) for preset in ("low", "medium", "high")]
    assert [c.interval for c in unets if c] == sorted(c.interval for c in unets if c)
    assert [c.threshold for c in transformers if c] == sorted(c.threshold for c in transformers if c)


def test_a_preset_is_overridden_field_by_field() -> None:
    medium = cache(acceleration="medium")
    assert medium is not None
    overridden = cache(acceleration="medium", options={"deepCacheInterval": 5, "cacheMaxConsecutiveSteps": 4})
    assert overridden == CacheSettings(kind="deepCache", start=medium.start, end=medium.end, max_consecutive=4,
                                       interval=5, branch=medium.branch)
    # A window field sent replaces the preset's alternative for the same bound.
    assert medium.end == 18  # the preset's 90 % of 20 steps
    by_step = cache(acceleration="medium", options={"cacheEndStep": 20})
    assert by_step is not None and by_step.end == 20
    # The cache itself can be turned off under a preset.
    assert cache(acceleration="high", options={"deepCache": False}) is None
    flux = cache("imagewire:tiny-flux@1", acceleration="low", options={"teaCacheDistance": 1.0})
    assert flux is not None and flux.threshold == acceleration.MAX_THRESHOLD


def test_the_wire_checks_each_options_range_by_its_path() -> None:
    for options, path in [({"teaCacheDistance": 1.5}, "acceleratorOptions.teaCacheDistance"),
                          ({"cacheMaxConsecutiveSteps": 6}, "acceleratorOptions.cacheMaxConsecutiveSteps"),
                          ({"deepCacheInterval": 0}, "acceleratorOptions.deepCacheInterval")]:
        [decoded] = protocol.decode_frame(orjson.dumps([{
            "taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": "tiny", "positivePrompt": "a fox",
            "width": 128, "height": 128, "acceleratorOptions": options}]), max_tasks=10)
        assert decoded.error is not None and decoded.error.parameter == path, decoded.error
    [decoded] = protocol.decode_frame(orjson.dumps([{
        "taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": "tiny", "positivePrompt": "a fox",
        "width": 128, "height": 128, "acceleration": "turbo"}]), max_tasks=10)
    assert decoded.error is not None and decoded.error.parameter == "acceleration"
