"""Pure tests of decoding and validation: every row of PROTOCOL.md §5, good and bad. No sockets."""

from __future__ import annotations

import tracemalloc
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
    # Empty means absent: what clients send for "none" (PROTOCOL.md §11), even for parameters not run yet.
    {"controlNet": [], "ipAdapters": [], "referenceImages": [], "outpaint": {}, "safety": {}},
    {"outputType": []}, {"safety": {"checkContent": None}},
    {"lora": [{"model": "tiny-lora", "weight": 0.8}]}, {"lora": [{"model": "imagewire:tiny-lora@1", "weight": -4}]},
    {"lora": [{"model": "tiny-lora", "weight": 4}], "embeddings": [{"model": "tiny-embedding"}]},
    {"lora": [{"model": "tiny-lora", "weight": None}]}, {"vae": "tiny-vae"}, {"clipSkip": 0}, {"clipSkip": 2},
    {"promptWeighting": "compel"}, {"promptWeighting": "sdEmbeds"}, {"promptWeighting": "sdembeds"},
    {"ipAdapters": [{"model": "tiny-ip-adapter", "guideImage": "g", "weight": None},
                    {"model": "imagewire:tiny-ip-adapter@1", "guideImage": "h", "weight": 0}]},
    {"usePromptWeighting": True}, {"usePromptWeighting": False}, {"lora": [], "embeddings": [], "refiner": {}},
    {"model": "tiny-sdxl", "refiner": {"model": "tiny-sdxl-refiner"}},
    {"model": "tiny-sdxl", "steps": 10, "refiner": {"model": "tiny-sdxl-refiner", "startStep": 9}},
    {"model": "tiny-sdxl", "refiner": {"model": "tiny-sdxl-refiner", "startStepPercentage": 62.5}},
    {"model": "tiny-sdxl", "refiner": {"model": "tiny-sdxl", "startStep": 4}},
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
    ({"outputFormat": "GIF"}, "invalidParameter", "outputFormat"),
    ({"outputQuality": 19}, "invalidParameter", "outputQuality"),
    ({"outputQuality": 100}, "invalidParameter", "outputQuality"),
    ({"deliveryMethod": "later"}, "invalidParameter", "deliveryMethod"),
    ({"includeCost": "yes"}, "invalidParameter", "includeCost"),
    ({"taskUUID": "not-a-uuid"}, "invalidParameter", "taskUUID"),
    ({"safety": {"mode": "strict"}}, "invalidParameter", "safety.mode"),
    ({"safety": {"checkContent": "yes"}}, "invalidParameter", "safety.checkContent"),
    ({"safety": {"checkContent": False, "nsfw": True}}, "unknownParameter", "safety.nsfw"),
    # LoRAs, embeddings, VAE, CLIP skip, prompt weighting, refiner: each bad value named by its path.
    ({"lora": [{"model": "tiny-lora", "weight": 4.5}]}, "invalidParameter", "lora[0].weight"),
    ({"lora": [{"model": "tiny-lora"}, {"model": "x:y@1", "weight": -5}]}, "invalidParameter", "lora[1].weight"),
    ({"lora": [{"weight": 1}]}, "missingParameter", "lora[0].model"),
    ({"lora": [{"model": "tiny-lora", "strength": 1}]}, "unknownParameter", "lora[0].strength"),
    ({"lora": [{"model": "runware:13090@1"}]}, "modelNotFound", "lora[0].model"),
    ({"lora": [{"model": "tiny-vae"}]}, "invalidParameter", "lora[0].model"),
    ({"lora": [{"model": "tiny-lora"}], "model": "tiny-sdxl"}, "invalidParameter", "lora[0].model"),
    ({"lora": [{"model": "tiny-lora"}, {"model": "imagewire:tiny-lora@1"}]}, "invalidParameter", "lora[1].model"),
    ({"lora": [{"model": "tiny-lora"}] * 11}, "invalidParameter", "lora"),
    ({"lora": {"model": "tiny-lora"}}, "invalidParameter", "lora"),
    ({"embeddings": [{"model": "tiny-embedding", "weight": 9}]}, "invalidParameter", "embeddings[0].weight"),
    ({"embeddings": [{"model": "tiny-lora"}]}, "invalidParameter", "embeddings[0].model"),
    ({"vae": "tiny-lora"}, "invalidParameter", "vae"),
    ({"vae": "tiny-vae", "model": "tiny-sdxl"}, "invalidParameter", "vae"),
    ({"clipSkip": 3}, "invalidParameter", "clipSkip"),
    ({"clipSkip": -1}, "invalidParameter", "clipSkip"),
    ({"clipSkip": "1"}, "invalidParameter", "clipSkip"),
    ({"promptWeighting": "fancy"}, "invalidParameter", "promptWeighting"),
    ({"usePromptWeighting": "yes"}, "invalidParameter", "usePromptWeighting"),
    ({"refiner": {"model": "tiny-sdxl-refiner"}}, "invalidParameter", "refiner"),
    ({"refiner": {"model": "tiny"}, "model": "tiny-sdxl"}, "invalidParameter", "refiner.model"),
    ({"refiner": {"model": "tiny-lora"}, "model": "tiny-sdxl"}, "invalidParameter", "refiner.model"),
    ({"refiner": {"startStep": 2}, "model": "tiny-sdxl"}, "missingParameter", "refiner.model"),
    ({"refiner": {"model": "tiny-sdxl-refiner", "startStep": 8}, "model": "tiny-sdxl", "steps": 8},
     "invalidParameter", "refiner.startStep"),
    ({"refiner": {"model": "tiny-sdxl-refiner", "startStep": 1}, "model": "tiny-sdxl"},
     "invalidParameter", "refiner.startStep"),
    ({"refiner": {"model": "tiny-sdxl-refiner", "startStepPercentage": 100}, "model": "tiny-sdxl"},
     "invalidParameter", "refiner.startStepPercentage"),
    ({"refiner": {"model": "tiny-sdxl-refiner", "startStepPercentage": 5}, "model": "tiny-sdxl", "steps": 4},
     "invalidParameter", "refiner.startStepPercentage"),
    ({"refiner": {"model": "tiny-sdxl-refiner", "startStep": 3, "startStepPercentage": 50}, "model": "tiny-sdxl"},
     "invalidParameter", "refiner.startStepPercentage"),
    ({"refiner": {"model": "tiny-sdxl-refiner"}, "model": "tiny-sdxl", "steps": 1}, "invalidParameter", "refiner"),
    ({"refiner": {"model": "tiny-sdxl-refiner"}, "model": "tiny-sdxl", "seedImage": "x"}, "invalidParameter",
     "refiner"),
    ({"refiner": {"model": "tiny-sdxl-refiner", "start": 3}, "model": "tiny-sdxl"}, "unknownParameter",
     "refiner.start"),
    ({"outputType": ["URL", "file"]}, "invalidParameter", "outputType[1]"),
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
    # The flow-matching families take LoRAs (of their own architecture) and no other add-ons: refused by the
    # member's path, before anything is queued.
    ({"lora": [{"model": "tiny-lora"}], "model": "tiny-flux"}, "invalidParameter", "lora[0].model"),
    ({"embeddings": [{"model": "tiny-embedding"}], "model": "tiny-sd3"}, "unsupportedParameter",
     "embeddings[0].model"),
    ({"vae": "tiny-vae", "model": "tiny-flux"}, "unsupportedParameter", "vae"),
    ({"clipSkip": 1, "model": "tiny-sd3"}, "unsupportedParameter", "clipSkip"),
    ({"promptWeighting": "compel", "model": "tiny-flux"}, "unsupportedParameter", "promptWeighting"),
    ({"usePromptWeighting": True, "model": "tiny-flux"}, "unsupportedParameter", "usePromptWeighting"),
    ({"refiner": {"model": "tiny-sdxl-refiner"}, "model": "tiny-flux"}, "invalidParameter", "refiner"),
    ({"ttl": 59}, "invalidParameter", "ttl"),
    ({"ttl": 10**9}, "invalidParameter", "ttl"),
    ({"ttl": 60.5}, "invalidParameter", "ttl"),
    ({"referenceImages": ["x"]}, "unsupportedParameter", "referenceImages"),
    ({"referenceImages": ["x", "y", "z"], "model": "tiny-flux-kontext"}, "invalidParameter", "referenceImages[2]"),
    ({"referenceImages": ["x", 1], "model": "tiny-flux-kontext"}, "invalidParameter", "referenceImages[1]"),
    ({"ipAdapters": [{"model": "runware:55@1"}]}, "missingParameter", "ipAdapters[0].guideImage"),
    ({"ipAdapters": [{"model": "tiny-ip-adapter", "guideImage": "g", "weight": -0.1}]}, "invalidParameter",
     "ipAdapters[0].weight"),
    ({"ipAdapters": [{"model": "tiny-ip-adapter", "guideImage": "g"}], "model": "tiny-flux"}, "unsupportedParameter",
     "ipAdapters"),
    ({"ipAdapters": [{"model": "tiny-ip-adapter", "guideImage": "g"}, {"model": "runware:55@5", "guideImage": "g"}]},
     "invalidParameter", "ipAdapters[1].model"),
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
    ({"taskType": "vectorize", "taskUUID": UUID}, "unsupportedTaskType"),
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


def test_empty_values_count_as_absent_only_for_parameters_of_the_task():
    assert settle(task(outputType=[], safety={})).output_types == ["URL"]
    # A key the task does not know stays unknown, whatever its value.
    for empty in ([], {}):
        error = error_of(task(loras=empty))
        assert (error.code, error.parameter) == ("unknownParameter", "loras")


def test_errors_inside_arrays_name_the_member_the_allowed_values_and_what_it_holds():
    error = error_of(task(outputType=["URL", "file"]))
    assert error.parameter == "outputType[1]" and error.allowed_values == ["URL", "base64Data", "dataURI"]
    assert error.message == "Invalid outputType[1]: expected one of 'URL', 'base64Data', 'dataURI'; received 'file'."


def test_add_ons_are_resolved_and_checked_against_the_model():
    add_ons = settle(task(lora=[{"model": "tiny-lora", "weight": 0.8}], embeddings=[{"model": "tiny-embedding"}],
                          vae="tiny-vae", clipSkip=2, promptWeighting="SDEMBEDS")).add_ons
    assert [(item.model.air, item.weight) for item in add_ons.loras] == [("imagewire:tiny-lora@1", 0.8)]
    assert [(item.model.air, item.weight) for item in add_ons.embeddings] == [("imagewire:tiny-embedding@1", 1.0)]
    assert add_ons.vae is not None and add_ons.vae.air == "imagewire:tiny-vae@1"
    assert (add_ons.clip_skip, add_ons.prompt_weighting, add_ons.refiner) == (2, "sdEmbeds", None)
    assert settle(task(usePromptWeighting=True)).add_ons.prompt_weighting == "compel"
    assert settle(task(usePromptWeighting=True, promptWeighting="sdEmbeds")).add_ons.prompt_weighting == "sdEmbeds"


def test_the_refiner_hand_off_is_a_fraction_of_the_steps():
    def start(steps: int, **refiner: Any) -> float:
        prepared = settle(task(model="tiny-sdxl", steps=steps, refiner={"model": "tiny-sdxl-refiner", **refiner}))
        assert prepared.add_ons.refiner is not None and prepared.add_ons.refiner.air == "imagewire:tiny-sdxl-refiner@1"
        return prepared.add_ons.refiner_start

    assert start(40, startStep=30) == 0.75
    assert start(10, startStepPercentage=35) == 0.35
    assert start(10) == 0.8          # neither given: the refiner takes the last fifth
    assert start(2) == 0.5           # ...but always leaves each model a step


def test_add_on_errors_say_what_fits_and_what_was_received():
    error = error_of(task(model="tiny-sdxl", lora=[{"model": "tiny-lora"}]))
    assert error.message == ("lora[0].model imagewire:tiny-lora@1 is a LoRA for tiny models (the architecture it "
                             "fits: tiny), and model imagewire:tiny-sdxl@1 is tiny-sdxl. LoRAs that fit tiny-sdxl "
                             "here: none.")
    assert error.allowed_values == []
    error = error_of(task(lora=[{"model": "tiny-lora", "weight": 4.5}]))
    assert error.message == "Invalid lora[0].weight: expected a number from -4 to 4; received 4.5."
    error = error_of(task(lora=[{"model": "tiny-vae"}]))
    assert error.message.startswith("lora[0].model must name a LoRA; imagewire:tiny-vae@1 is a VAE. LoRAs here: ")
    assert error.allowed_values == ["imagewire:tiny-lora@1"]
    error = error_of(task(model="tiny-sdxl", steps=8, refiner={"model": "tiny-sdxl-refiner", "startStep": 8}))
    assert "from 2 to 7" in error.message and "received 8" in error.message
    assert error.allowed_values == [2, 3, 4, 5, 6, 7]
    error = error_of(task(model="tiny-sdxl", refiner={"model": "tiny"}))
    assert error.allowed_values == ["imagewire:tiny-sdxl@1", "imagewire:tiny-sdxl-refiner@1"]
    error = error_of(task(promptWeighting="fancy"))
    assert error.allowed_values == ["compel", "sdEmbeds"] and "received 'fancy'" in error.message
    error = error_of(task(clipSkip=3))
    assert error.message == "Invalid clipSkip: expected an integer from 0 to 2; received 3."


def test_a_lone_surrogate_anywhere_is_named_in_an_error_that_is_itself_valid_text():
    frame = ('[{"taskType":"ping","ping":true,"note":"fine \\ud83d\\ude00 \\ud800"},'
             '{"taskType":"ping","\\udc00":1},{"taskType":"ping","ping":true}]')
    in_value, in_key, fine = protocol.decode_frame(frame, max_tasks=10)
    assert in_value.error is not None and in_value.error.parameter == "note"
    assert in_key.error is not None and in_key.error.parameter == "\ufffd"
    orjson.loads(protocol.error_frame(in_key.error, in_key.task_type, in_key.task_uuid))
    assert fine.error is None and fine.task == schema.Ping(ping=True)
    # What the standard library's parser would take beyond JSON stays refused on that path too.
    with pytest.raises(protocol.FrameError):
        protocol.decode_frame('[{"taskType":"ping","x":"\\ud800","y":NaN}]', max_tasks=10)


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3", "runware:101@1", "imagewire:sd35-large@1",
                                   "runware:106@1"])
def test_add_ons_on_flow_models_are_refused_naming_the_member_and_the_architectures_that_take_them(model):
    error = error_of(task(model=model, lora=[{"model": "tiny-lora", "weight": 0.5}], clipSkip=1))
    assert (error.code, error.parameter) == ("unsupportedParameter", "clipSkip")
    assert {"tiny", "sd15", "sdxl", "tiny-sdxl", "sd15-inpaint"} <= set(error.allowed_values or ())
    assert not {"tiny-flux", "flux1-dev", "sd3", "sd35-large"} & set(error.allowed_values or ())
    assert "embeddings, VAEs, clipSkip and promptWeighting apply" in error.message and "sd15, sd21" in error.message
    # The first add-on the request has is the one named.
    assert error_of(task(model=model, clipSkip=1, vae="tiny-vae")).parameter == "vae"
    # LoRAs apply to these models: one made for another architecture is refused as not fitting.
    error = error_of(task(model=model, lora=[{"model": "tiny-lora", "weight": 0.5}]))
    assert (error.code, error.parameter) == ("invalidParameter", "lora[0].model")
    assert "imagewire:tiny-lora@1 is a LoRA for tiny models" in error.message


@pytest.mark.parametrize("model", ["flux-dev", "flux-schnell", "runware:106@1", "runware:102@1"],
                         ids=["dev", "schnell", "kontext", "fill"])
def test_a_flux_lora_fits_every_flux_variant(model):
    import dataclasses

    catalog = Catalog.load()
    flux_lora = dataclasses.replace(catalog.resolve("tiny-lora"), air="test:flux-lora@1", aliases=(),
                                    architecture="flux1-dev")
    context = pure_context(catalog=Catalog([*catalog.entries, flux_lora]))
    extra = {"seedImage": "x", "maskImage": "y"} if model == "runware:102@1" else {}
    decoded = decode(task(model=model, lora=[{"model": "test:flux-lora@1", "weight": 0.7}], **extra))
    assert decoded.task is not None
    prepared = image_inference.prepare(decoded.task, context)
    assert [(lora.model.air, lora.weight) for lora in prepared.add_ons.loras] == [("test:flux-lora@1", 0.7)]
    # And nothing made for [dev] fits SD 3.
    sd3 = decode(task(model="imagewire:sd35-large@1", lora=[{"model": "test:flux-lora@1"}]))
    with pytest.raises(TaskError) as caught:
        image_inference.prepare(sd3.task, context)
    assert caught.value.parameter == "lora[0].model"


def test_add_ons_fit_an_inpainting_checkpoint_through_the_architecture_it_came_from():
    prepared = settle(task(model="imagewire:tiny-inpaint@1", seedImage="x", maskImage="y",
                           lora=[{"model": "tiny-lora"}], vae="tiny-vae", embeddings=[{"model": "tiny-embedding"}]))
    assert [item.model.air for item in prepared.add_ons.loras] == ["imagewire:tiny-lora@1"]
    assert prepared.add_ons.vae is not None and prepared.add_ons.vae.air == "imagewire:tiny-vae@1"


def test_a_refused_task_does_not_keep_its_text_alive_until_it_is_answered() -> None:
    pad = "x" * 1_000_000
    frame = "[" + ",".join(['{"taskType":"ping","ping":true,"pad":"' + pad + '"}'] * 8) + "]"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        decoded = protocol.decode_frame(frame, max_tasks=64)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert [item.error.parameter for item in decoded if item.error] == ["pad"] * 8
    # Eight refused tasks of 1 MB each: what their errors keep is their short messages, not the tasks.
    assert kept < 200_000, kept
