"""Pure tests of decoding and validation: every row of PROTOCOL.md §5, good and bad. No sockets."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from imagewire.air_registry.catalog import Catalog
from imagewire.server import protocol
from imagewire.tasks import image_inference, schema
from imagewire.tasks.errors import TaskError
from tests.contexts import pure_context

UUID = "6f1c2a4e-9a6b-4c7d-8e2f-1a2b3c4d5e6f"
TINY = Catalog.load().resolve("imagewire:tiny@1")
CONTEXT = pure_context()


def task(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"taskType": "imageInference", "taskUUID": UUID, "model": "imagewire:tiny@1",
                            "positivePrompt": "a lighthouse", "width": 256, "height": 256}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def decode(obj: dict[str, Any]) -> protocol.Decoded:
    [decoded] = protocol.decode_frame(orjson.dumps([obj]), max_tasks=10)
    return decoded


def settle(obj: dict[str, Any]) -> image_inference.Prepared:
    """Decode and prepare (every check without I/O); raise the TaskError a client would get."""
    decoded = decode(obj)
    if decoded.error:
        raise decoded.error
    assert isinstance(decoded.task, schema.ImageInference)
    return image_inference.prepare(decoded.task, CONTEXT)


def error_of(obj: dict[str, Any]) -> TaskError:
    with pytest.raises(TaskError) as caught:
        settle(obj)
    return caught.value


GOOD = [
    {}, {"negativePrompt": "blurry"}, {"positivePrompt": "__BLANK__"}, {"width": 128, "height": 2048},
    {"strength": 1.0, "seedImage": "x"}, {"steps": 1}, {"steps": 100}, {"CFGScale": 0}, {"CFGScale": 50},
    {"scheduler": "Euler a"}, {"scheduler": "dpm++ 2m karras"}, {"scheduler": "EulerDiscreteScheduler"},
    {"seed": 0}, {"seed": 9223372036854775807}, {"numberResults": 20}, {"outputType": "base64Data"},
    {"outputType": ["URL", "dataURI"]}, {"outputFormat": "png"}, {"outputFormat": "WEBP"}, {"outputQuality": 20},
    {"outputQuality": 99}, {"deliveryMethod": "async"}, {"includeCost": True}, {"webhookURL": "https://x.example/h"},
    {"safety": {"checkContent": False}},
    {"safety": {"checkContent": False, "mode": "none", "tolerance": True}},
    # Content checks are checked here; whether the checker's weights are on the server, in run.
    {"safety": {"checkContent": True}}, {"safety": {"checkInputs": True, "mode": "fast"}}, {"checkNSFW": True},
    {"controlNet": []},  # empty arrays mean absent
    {"seedImage": "x", "maskImage": "y", "maskMargin": 32},
    {"seedImage": "x", "outpaint": {"top": 64, "right": None, "blur": 16}},
    {"model": "imagewire:tiny-inpaint@1", "seedImage": "x", "maskImage": "y"},
    {"controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": "g", "weight": None, "startStep": None,
                     "endStep": None, "startStepPercentage": None, "endStepPercentage": None, "controlMode": None}]},
    {"controlNet": [{"model": "tiny-controlnet", "guideImage": "g", "controlMode": "controlnet", "startStep": 2,
                     "endStepPercentage": 80}] * 2},
    {"model": "imagewire:tiny-inpaint@1", "seedImage": "x", "maskImage": "y",
     "controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": "g", "preprocessor": "canny",
                     "lowThresholdCanny": 10, "highThresholdCanny": 20}]},
    {"seedImage": "x", "width": None, "height": None},
    {"negativePrompt": None, "seed": None},
]


@pytest.mark.parametrize("fields", GOOD, ids=[orjson.dumps(f).decode() for f in GOOD])
def test_valid_requests_pass(fields):
    settle(task(**fields))


BAD = [
    ({"positivePrompt": "a"}, "invalidParameter", "positivePrompt"),
    ({"positivePrompt": "x" * 3001}, "invalidParameter", "positivePrompt"),
    ({"positivePrompt": ...}, "missingParameter", "positivePrompt"),
    ({"negativePrompt": "x" * 3001}, "invalidParameter", "negativePrompt"),
    ({"model": ...}, "missingParameter", "model"),
    ({"width": ...}, "missingParameter", "width"),
    ({"height": ...}, "missingParameter", "height"),
    ({"width": 64}, "invalidWidth", "width"),
    ({"width": 4096}, "invalidWidth", "width"),
    ({"height": -64}, "invalidHeight", "height"),
    ({"width": 500}, "invalidWidth", "width"),
    ({"height": 700}, "invalidHeight", "height"),
    ({"width": "512"}, "invalidParameter", "width"),
    ({"width": 512.5}, "invalidParameter", "width"),
    ({"strength": 0, "seedImage": "x"}, "invalidParameter", "strength"),
    ({"strength": 1.5, "seedImage": "x"}, "invalidParameter", "strength"),
    ({"strength": 0.04, "steps": 20, "seedImage": "x"}, "invalidParameter", "strength"),
    ({"steps": 0}, "invalidParameter", "steps"),
    ({"steps": 101}, "invalidParameter", "steps"),
    ({"CFGScale": -1}, "invalidParameter", "CFGScale"),
    ({"CFGScale": 51}, "invalidParameter", "CFGScale"),
    ({"scheduler": "Nope"}, "invalidParameter", "scheduler"),
    ({"seed": -1}, "invalidParameter", "seed"),
    ({"seed": 9223372036854775808}, "invalidParameter", "seed"),
    ({"numberResults": 0}, "invalidParameter", "numberResults"),
    ({"numberResults": 21}, "invalidParameter", "numberResults"),
    ({"outputType": "file"}, "invalidParameter", "outputType"),
    ({"outputType": []}, "invalidParameter", "outputType"),
    ({"outputFormat": "GIF"}, "invalidParameter", "outputFormat"),
    ({"outputQuality": 19}, "invalidParameter", "outputQuality"),
    ({"outputQuality": 100}, "invalidParameter", "outputQuality"),
    ({"deliveryMethod": "later"}, "invalidParameter", "deliveryMethod"),
    ({"includeCost": "yes"}, "invalidParameter", "includeCost"),
    ({"taskUUID": "not-a-uuid"}, "invalidParameter", "taskUUID"),
    ({"safety": {"mode": "strict"}}, "invalidParameter", "safety.mode"),
    ({"safety": {"checkContent": "yes"}}, "invalidParameter", "safety.checkContent"),
    ({"safety": {"checkContent": False, "nsfw": True}}, "unknownParameter", "safety.nsfw"),
    ({"lora": [{"model": "x", "weight": 1}]}, "unsupportedParameter", "lora"),
    ({"maskImage": "x"}, "missingParameter", "seedImage"),
    ({"outpaint": {"top": 64}}, "missingParameter", "seedImage"),
    ({"seedImage": "x", "maskImage": "y", "outpaint": {"top": 64}}, "invalidParameter", "outpaint"),
    ({"seedImage": "x", "outpaint": {"top": 100}}, "invalidParameter", "outpaint.top"),
    ({"seedImage": "x", "outpaint": {"left": -64}}, "invalidParameter", "outpaint.left"),
    ({"seedImage": "x", "outpaint": {"blur": 33, "top": 64}}, "invalidParameter", "outpaint.blur"),
    ({"seedImage": "x", "outpaint": {"top": 64, "middle": 64}}, "unknownParameter", "outpaint.middle"),
    ({"seedImage": "x", "maskImage": "y", "maskMargin": 16}, "invalidParameter", "maskMargin"),
    ({"seedImage": "x", "maskImage": "y", "maskMargin": 129}, "invalidParameter", "maskMargin"),
    ({"seedImage": "x", "maskMargin": 32}, "invalidParameter", "maskMargin"),
    ({"model": "imagewire:tiny-inpaint@1", "seedImage": "x"}, "missingParameter", "maskImage"),
    ({"model": "imagewire:tiny-inpaint@1"}, "missingParameter", "seedImage"),
    ({"model": "imagewire:tiny-controlnet@1"}, "invalidParameter", "model"),
    ({"controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": "g", "weight": 2}]},
     "invalidParameter", "controlNet[0].weight"),
    ({"controlNet": [{"model": "imagewire:tiny-controlnet@1"}]}, "missingParameter", "controlNet[0].guideImage"),
    ({"controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": "g", "mode": "x"}]},
     "unknownParameter", "controlNet[0].mode"),
    ({"controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": "g", "controlMode": "strong"}]},
     "invalidParameter", "controlNet[0].controlMode"),
    ({"controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": "g"},
                     {"model": "imagewire:sd15-controlnet-canny@1", "guideImage": "g"}]},
     "invalidParameter", "controlNet[1].model"),
    ({"controlNet": [{"model": "imagewire:tiny@1", "guideImage": "g"}]}, "invalidParameter", "controlNet[0].model"),
    ({"controlNet": [{"model": "nope:1@1", "guideImage": "g"}]}, "modelNotFound", "controlNet[0].model"),
    ({"controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": "g", "startStep": 9}], "steps": 8},
     "invalidParameter", "controlNet[0].startStep"),
    ({"controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": "g", "startStep": 2,
                      "startStepPercentage": 10}]}, "invalidParameter", "controlNet[0].startStepPercentage"),
    ({"controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": "g", "startStepPercentage": 50,
                      "endStepPercentage": 40}]}, "invalidParameter", "controlNet[0].endStepPercentage"),
    ({"controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": "g", "preprocessor": "depth_midas"}]},
     "invalidParameter", "controlNet[0].preprocessor"),
    ({"controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": "g", "preprocessor": "canny",
                      "lowThresholdCanny": 200, "highThresholdCanny": 100}]},
     "invalidParameter", "controlNet[0].lowThresholdCanny"),
    ({"controlNet": [{"model": "imagewire:tiny-controlnet@1", "guideImage": "g"}] * 5},
     "invalidParameter", "controlNet"),
    ({"ttl": 60}, "unsupportedParameter", "ttl"),
    ({"frobnicate": 1}, "unknownParameter", "frobnicate"),
    ({"cfgScale": 7}, "unknownParameter", "cfgScale"),
]


@pytest.mark.parametrize("fields,code,parameter", BAD, ids=[f"{p}:{c}" for _, c, p in BAD])
def test_invalid_requests_name_the_parameter(fields, code, parameter):
    error = error_of(task(**fields))
    assert (error.code, error.parameter) == (code, parameter), error.message
    item = error.to_item("imageInference", UUID)
    assert item["taskUUID"] == UUID and item["taskType"] == "imageInference"
    assert parameter in error.message
    # Every message says what is allowed: never a placeholder, and the type is a JSON type when given.
    assert "a valid value" not in error.message
    json_types = {"integer", "number", "string", "boolean", "array", "object"}
    assert "type" not in item or set(item["type"].split(" or ")) <= json_types, item


def test_messages_say_what_is_allowed_and_what_was_received():
    error = error_of(task(steps=0))
    assert "1 to 100" in error.message and "received 0" in error.message
    error = error_of(task(width=500))
    assert "448" in error.message and "512" in error.message and error.allowed_values == [448, 512]
    error = error_of(task(width=4096))
    assert "128 to 2048" in error.message and "received 4096" in error.message and error.allowed_values == [2048]
    error = error_of(task(height=64))
    assert error.allowed_values == [128] and error.to_item("imageInference", UUID)["type"] == "integer"
    error = error_of(task(taskUUID=...))
    assert (error.code, error.message) == ("missingParameter", "taskUUID is required: expected a UUID string.")
    error = error_of(task(outputFormat="GIF"))
    assert error.allowed_values == ["JPG", "PNG", "WEBP"] and "'GIF'" in error.message
    error = error_of(task(strength=0.04, steps=20, seedImage="x"))
    assert "0.05" in error.message


def test_defaults_come_from_the_model_and_seeds_count_up():
    settings = settle(task(seed=10, numberResults=3))
    assert settings.seeds == [10, 11, 12]
    assert settle(task(seed=9223372036854775806, numberResults=3)).seeds == [9223372036854775806,
                                                                             9223372036854775807, 0]
    assert settings.steps == TINY.defaults.steps and settings.cfg_scale == TINY.defaults.cfg_scale
    assert settings.output_types == ["URL"] and settings.output_format.name == "JPG" and settings.output_quality == 95
    assert settle(task(positivePrompt="__BLANK__")).prompt == ""
    random_seeds = {settle(task()).seeds[0] for _ in range(5)}
    assert len(random_seeds) > 1


def test_dimension_from_the_seed_image_is_rounded_to_64_and_clamped():
    assert image_inference.size_from_seed(None, 300) == 320
    assert image_inference.size_from_seed(None, 90) == 128
    assert image_inference.size_from_seed(None, 5000) == 2048
    assert image_inference.size_from_seed(512, 5000) == 512


@pytest.mark.parametrize("obj,code", [
    ({"taskUUID": UUID}, "missingParameter"),
    ({"taskType": "imageMasking", "taskUUID": UUID}, "unsupportedTaskType"),
    ({"taskType": "doesNotExist", "taskUUID": UUID}, "unsupportedTaskType"),
    ({"taskType": 5, "taskUUID": UUID}, "missingParameter"),
])
def test_task_type_errors_keep_the_task_uuid(obj, code):
    decoded = decode(obj)
    assert decoded.error is not None and decoded.error.code == code
    assert decoded.task_uuid == UUID


def test_too_many_tasks_in_one_message_is_a_frame_error():
    with pytest.raises(protocol.FrameError):
        protocol.decode_frame(orjson.dumps([{"taskType": "ping"}] * 11), max_tasks=10)


def test_outbound_items_leave_absent_fields_off_the_wire():
    frame = protocol.encode_frame(data=[schema.ImageResult(taskType="imageInference", taskUUID=UUID,
                                                           imageUUID=UUID, seed=1, imageURL="http://x/y.png")])
    item = orjson.loads(frame)["data"][0]
    assert set(item) == {"taskType", "taskUUID", "imageUUID", "seed", "imageURL"}
    assert not any(item.get(key) for key in ("code", "error", "errorId"))


def test_the_wire_schema_is_exported_and_names_fields_exactly():
    components = schema.json_schema()
    inference = components["ImageInference"]["properties"]
    assert {"taskUUID", "CFGScale", "positivePrompt", "seedImage"} <= set(inference)
    assert inference["steps"]["anyOf"][0]["maximum"] == 100
