"""The tool task types' checks before any work (prepare): input images in both shapes, models, settings."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from imagewire.server.protocol import convert_task
from imagewire.tasks import schema
from imagewire.tasks.errors import TaskError
from imagewire.tasks.image_upscale import check_result_size
from imagewire.tasks.matting import MattingSettings
from imagewire.tasks.prompt_enhance import request_seed
from imagewire.tasks.supported import SUPPORTED
from tests.contexts import pure_context

UUID = "6f1c2a4e-9a6b-4c7d-8e2f-1a2b3c4d5e6f"
IMAGE = "aGVsbG8="  # any string: prepare does not decode images
IMAGE_TOOLS = ["imageUpscale", "upscale", "imageBackgroundRemoval", "removeBackground", "imageCaption", "caption"]
EXTRA = {"imageUpscale": {"upscaleFactor": 2}, "upscale": {"upscaleFactor": 2}}


def prepared(task_type: str, **fields: Any) -> Any:
    task = convert_task({"taskType": task_type, "taskUUID": UUID, **EXTRA.get(task_type, {}), **fields},
                        SUPPORTED[task_type].struct)
    return SUPPORTED[task_type].prepare(task, pure_context())


def error(task_type: str, **fields: Any) -> TaskError:
    with pytest.raises(TaskError) as caught:
        prepared(task_type, **fields)
    return caught.value


@pytest.mark.parametrize("task_type", IMAGE_TOOLS)
def test_both_spellings_take_the_image_in_both_shapes(task_type: str) -> None:
    assert (prepared(task_type, inputImage=IMAGE).image_parameter, prepared(task_type, inputImage=IMAGE).image) == (
        "inputImage", IMAGE)
    nested = prepared(task_type, inputs={"image": IMAGE})
    assert (nested.image_parameter, nested.image) == ("inputs.image", IMAGE)
    # The same image in both places is one image.
    assert prepared(task_type, inputImage=IMAGE, inputs={"image": IMAGE}).image == IMAGE


@pytest.mark.parametrize("task_type", IMAGE_TOOLS)
def test_a_missing_image_is_named(task_type: str) -> None:
    for fields in ({}, {"inputs": {}}, {"inputs": {"image": None}}):
        missing = error(task_type, **fields)
        assert (missing.code, missing.parameter) == ("missingParameter", "inputImage")
        assert "inputs.image" in missing.message


@pytest.mark.parametrize("task_type", IMAGE_TOOLS)
def test_other_inputs_and_two_different_images_are_refused(task_type: str) -> None:
    other = error(task_type, inputs={"image": IMAGE, "mask": IMAGE})
    assert (other.code, other.parameter) == ("unsupportedParameter", "inputs.mask")
    both = error(task_type, inputImage=IMAGE, inputs={"image": "b3RoZXI="})
    assert (both.code, both.parameter) == ("invalidParameter", "inputs.image")
    not_text = error(task_type, inputs={"image": 5})
    assert (not_text.code, not_text.parameter) == ("invalidParameter", "inputs.image")


@pytest.mark.parametrize(("task_type", "default", "curated"), [
    ("imageUpscale", "imagewire:tiny-upscaler@1", "runware:504@1"),
    ("removeBackground", "imagewire:tiny-background@1", "runware:112@5"),
    ("imageBackgroundRemoval", "imagewire:tiny-background@1", "runware:109@1"),
    ("caption", "imagewire:tiny-caption@1", "runware:151@1"),
])
def test_the_default_model_and_the_ids_the_sdks_send(task_type: str, default: str, curated: str) -> None:
    assert prepared(task_type, inputImage=IMAGE).model.air == default
    assert prepared(task_type, inputImage=IMAGE, model=curated).model.air == curated


def test_prompt_enhance_has_a_default_model_and_takes_the_curated_id() -> None:
    base = {"prompt": "a fox", "promptMaxLength": 64, "promptVersions": 2}
    assert prepared("promptEnhance", **base).model.air == "imagewire:tiny-prompt@1"
    curated = prepared("promptEnhance", **base, model="runware:llama-3-1-8b@prompt-enhancer")
    assert curated.model.architecture == "llama"


@pytest.mark.parametrize(("task_type", "model"), [
    ("imageUpscale", "imagewire:tiny@1"), ("caption", "imagewire:tiny-upscaler@1"),
    ("removeBackground", "runware:151@1"),
])
def test_a_model_of_another_task_type_is_refused_naming_the_fitting_ones(task_type: str, model: str) -> None:
    wrong = error(task_type, inputImage=IMAGE, model=model)
    assert (wrong.code, wrong.parameter) == ("invalidParameter", "model")
    assert wrong.allowed_values and model not in wrong.allowed_values
    assert "SDXL" not in str(wrong.allowed_values)


def test_inference_refuses_a_tool_model() -> None:
    task = convert_task({"taskType": "imageInference", "taskUUID": UUID, "model": "runware:504@1",
                         "positivePrompt": "a fox", "width": 128, "height": 128}, schema.ImageInference)
    with pytest.raises(TaskError) as caught:
        SUPPORTED["imageInference"].prepare(task, pure_context())
    assert (caught.value.code, caught.value.parameter) == ("invalidParameter", "model")
    assert "imagewire:tiny@1" in (caught.value.allowed_values or [])


def test_an_unknown_model_is_model_not_found() -> None:
    unknown = error("upscale", inputImage=IMAGE, model="runware:999@1")
    assert (unknown.code, unknown.parameter) == ("modelNotFound", "model")


@pytest.mark.parametrize(("fields", "parameter"), [
    ({"upscaleFactor": 5}, "upscaleFactor"), ({"upscaleFactor": 1}, "upscaleFactor"),
    ({"upscaleFactor": "2"}, "upscaleFactor"), ({"outputQuality": 100}, "outputQuality"),
])
def test_out_of_range_upscale_values_are_named(fields: dict[str, Any], parameter: str) -> None:
    with pytest.raises(TaskError) as caught:
        convert_task({"taskType": "upscale", "taskUUID": UUID, "inputImage": IMAGE, **fields}, schema.Upscale)
    assert (caught.value.code, caught.value.parameter) == ("invalidParameter", parameter)
    assert "from 2 to 4" in caught.value.message or parameter != "upscaleFactor"


def test_an_upscale_factor_is_required() -> None:
    with pytest.raises(TaskError) as caught:
        convert_task({"taskType": "imageUpscale", "taskUUID": UUID, "inputImage": IMAGE}, schema.ImageUpscale)
    assert (caught.value.code, caught.value.parameter) == ("missingParameter", "upscaleFactor")


def test_a_result_over_the_size_limit_is_refused_naming_what_fits() -> None:
    check_result_size(1024, 1024, 4, 4096 * 4096)
    with pytest.raises(TaskError) as caught:
        check_result_size(1100, 1000, 4, 4096 * 4096)
    assert (caught.value.code, caught.value.parameter) == ("invalidParameter", "upscaleFactor")
    assert "4400x4000" in caught.value.message and "at most 3.9 " in caught.value.message
    with pytest.raises(TaskError) as small:
        check_result_size(3000, 3000, 2, 4096 * 4096)
    assert "use a smaller image" in small.value.message


def test_background_settings_come_nested_or_at_the_top_level() -> None:
    nested = prepared("removeBackground", inputImage=IMAGE, settings={"rgba": [1, 2, 3, 0.5], "alphaMatting": True})
    assert nested.settings == MattingSettings(rgba=(1, 2, 3, 0.5), alpha_matting=True)
    # The Python SDK's shape: the settings' fields beside inputImage, with its False defaults.
    top = prepared("imageBackgroundRemoval", inputImage=IMAGE, rgba=[9, 9, 9, 1], returnOnlyMask=False,
                   alphaMatting=False, postProcessMask=True, alphaMattingErodeSize=3)
    assert top.settings == MattingSettings(rgba=(9, 9, 9, 1.0), post_process_mask=True, erode_size=3)
    assert prepared("removeBackground", inputImage=IMAGE).settings == MattingSettings()


def test_background_settings_that_contradict_are_refused() -> None:
    twice = error("removeBackground", inputImage=IMAGE, alphaMatting=True, settings={"alphaMatting": False})
    assert (twice.code, twice.parameter) == ("invalidParameter", "settings.alphaMatting")
    order = error("removeBackground", inputImage=IMAGE, settings={
        "alphaMatting": True, "alphaMattingForegroundThreshold": 20, "alphaMattingBackgroundThreshold": 30})
    assert order.parameter == "settings.alphaMattingBackgroundThreshold"


@pytest.mark.parametrize(("settings", "parameter", "code"), [
    ({"rgba": [255, 255, 255, 2]}, "settings.rgba[3]", "invalidParameter"),
    ({"rgba": [256, 0, 0, 0]}, "settings.rgba[0]", "invalidParameter"),
    ({"rgba": [255, 255, 255]}, "settings.rgba", "invalidParameter"),
    ({"alphaMattingErodeSize": 0}, "settings.alphaMattingErodeSize", "invalidParameter"),
    ({"colour": "red"}, "settings.colour", "unknownParameter"),
])
def test_bad_settings_are_named_by_their_path(settings: dict[str, Any], parameter: str, code: str) -> None:
    with pytest.raises(TaskError) as caught:
        convert_task({"taskType": "removeBackground", "taskUUID": UUID, "inputImage": IMAGE, "settings": settings},
                     schema.RemoveBackground)
    assert (caught.value.code, caught.value.parameter) == (code, parameter)


def test_caption_prompts_as_a_string_or_the_python_sdks_list() -> None:
    assert prepared("caption", inputImage=IMAGE, prompt="a photo of").prompt == "a photo of"
    assert prepared("imageCaption", inputImage=IMAGE, prompt=["a photo", "of"]).prompt == "a photo of"
    assert prepared("caption", inputImage=IMAGE, prompt=" ").prompt is None


def test_prompt_enhance_limits_and_its_request_seed() -> None:
    for fields, parameter in (({"promptVersions": 6}, "promptVersions"), ({"promptMaxLength": 11}, "promptMaxLength"),
                              ({"prompt": ""}, "prompt")):
        task = {"taskType": "promptEnhance", "taskUUID": UUID, "prompt": "a fox", "promptMaxLength": 64,
                "promptVersions": 2, **fields}
        with pytest.raises(TaskError) as caught:
            convert_task(task, schema.PromptEnhance)
        assert caught.value.parameter == parameter
    base = {"prompt": "a fox", "promptMaxLength": 64, "promptVersions": 2}
    assert prepared("promptEnhance", **base).seed == request_seed("a fox", 64) == prepared("promptEnhance", **base).seed
    assert request_seed("a fox", 65) != request_seed("a fox", 64)
    assert prepared("promptEnhance", **base, seed=5).seed == 5


def test_answers_echo_the_spelling_sent() -> None:
    from imagewire.tasks.task_type import name_of

    for spelling in ("imageUpscale", "upscale"):
        assert SUPPORTED[spelling].name == spelling
        task = msgspec.convert({"taskType": spelling, "taskUUID": UUID, "upscaleFactor": 2}, schema.AnyTask)
        assert name_of(task) == spelling
    assert SUPPORTED["upscale"].prepare is SUPPORTED["imageUpscale"].prepare
    for spelling in ("imageControlNetPreProcess", "controlNetPreprocess"):
        assert SUPPORTED[spelling].name == spelling
        task = msgspec.convert({"taskType": spelling, "taskUUID": UUID, "preProcessorType": "canny"}, schema.AnyTask)
        assert name_of(task) == spelling and isinstance(task, schema.ImageControlNetPreProcess)
    assert SUPPORTED["controlNetPreprocess"].run is SUPPORTED["imageControlNetPreProcess"].run
