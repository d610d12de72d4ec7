"""No field is accepted and then ignored.

For every task type: each field its wire struct accepts is listed here with the modules that honour it (and a
test fails when one of them no longer reads it, or when the struct gains a field this table lacks); each field
Runware documents for it (its page in Runware's docs, copied below by name) is either accepted or refused with
``unsupportedParameter`` naming it. A field that only matters in a case this server refuses is listed as moot,
with a check that the case is refused.
"""

from __future__ import annotations

import ast
import uuid
from functools import cache
from pathlib import Path

import msgspec
import orjson
import pytest

from imagewire.server import protocol
from imagewire.tasks import guides, schema
from imagewire.tasks.supported import SUPPORTED

ROOT = Path(__file__).resolve().parents[2]

DELIVERY = {"deliveryMethod": ("tasks/task_type.py",), "webhookURL": ("tasks/task_type.py",)}
# ttl and uploadEndpoint are read with the output settings, for every task type that makes images.
OUTPUT = {name: ("tasks/outputs.py",)
          for name in ("outputType", "outputFormat", "outputQuality", "ttl", "uploadEndpoint")}
INPUT_IMAGE = {"inputImage": ("tasks/tools.py",), "inputs": ("tasks/tools.py",)}


def handled_by(module: str, *fields: str) -> dict[str, tuple[str, ...]]:
    return {field: (module,) for field in fields}


# Each wire struct's fields, and the modules (paths from the repository root) whose code reads each one.
HONOURED: dict[type[schema.Task], dict[str, tuple[str, ...]]] = {
    schema.ImageInference: {
        **handled_by("tasks/image_inference.py", "taskUUID", "model", "positivePrompt", "negativePrompt", "width",
                     "height", "strength", "steps", "CFGScale", "scheduler", "seed", "numberResults", "includeCost",
                     "includeProgress", "includePreview"),
        "seedImage": ("tasks/image_inference.py", "tasks/editing.py"),
        **handled_by("tasks/content_safety.py", "checkNSFW", "safety"),
        **handled_by("tasks/image_add_ons.py", "lora", "embeddings", "vae", "clipSkip", "promptWeighting",
                     "usePromptWeighting", "refiner"),
        **handled_by("tasks/editing.py", "maskImage", "maskMargin", "outpaint", "controlNet"),
        "referenceImages": ("tasks/references.py",),
        "inputs": ("tasks/image_inference.py",),
        **handled_by("tasks/acceleration.py", "acceleration", "acceleratorOptions"),
        "ipAdapters": ("tasks/ip_adapters.py",),
        **OUTPUT, **DELIVERY,
    },
    schema.ImageUpload: {**handled_by("tasks/image_upload.py", "taskUUID", "image"), **DELIVERY},
    schema.ModelSearch: {
        **handled_by("tasks/model_search.py", "taskUUID", "search", "tags", "category", "type", "architecture",
                     "conditioning", "visibility", "limit", "offset"),
        **DELIVERY,
    },
    schema.GetResponse: handled_by("tasks/get_response.py", "taskUUID"),
    schema.CancelTask: handled_by("tasks/cancel_task.py", "taskUUID"),
    schema.ImageHistory: handled_by("tasks/image_history.py", "taskUUID", "limit"),
    schema.ImageUpscale: {
        **handled_by("tasks/image_upscale.py", "taskUUID", "upscaleFactor", "model", "includeCost"),
        **INPUT_IMAGE, **OUTPUT, **DELIVERY,
    },
    schema.ImageBackgroundRemoval: {
        # The settings are read by their wire names, at the top level or inside ``settings``.
        **handled_by("tasks/background_removal.py", "taskUUID", "model", "includeCost", "settings", "rgba",
                     "postProcessMask", "returnOnlyMask", "alphaMatting", "alphaMattingForegroundThreshold",
                     "alphaMattingBackgroundThreshold", "alphaMattingErodeSize"),
        **INPUT_IMAGE, **OUTPUT, **DELIVERY,
    },
    schema.ImageCaption: {
        **handled_by("tasks/image_caption.py", "taskUUID", "model", "prompt", "includeCost"),
        **INPUT_IMAGE, **DELIVERY,
    },
    schema.PromptEnhance: {
        **handled_by("tasks/prompt_enhance.py", "taskUUID", "prompt", "promptMaxLength", "promptVersions", "model",
                     "seed", "includeCost"),
        **DELIVERY,
    },
    schema.ImageControlNetPreProcess: {
        **handled_by("tasks/controlnet_preprocess.py", "taskUUID", "preProcessorType", "model", "width", "height",
                     "lowThresholdCanny", "highThresholdCanny", "includeCost"),
        **INPUT_IMAGE, **OUTPUT, **DELIVERY,
    },
    schema.ImageMasking: {
        # The settings are read by their wire names, at the top level or inside ``settings``.
        **handled_by("tasks/image_masking.py", "taskUUID", "model", "includeCost", "settings", "confidence",
                     "maxDetections", "maskPadding", "maskBlur"),
        **INPUT_IMAGE, **OUTPUT, **DELIVERY,
    },
    schema.ModelUpload: {
        **handled_by("tasks/model_upload.py", "taskUUID", "category", "architecture", "format", "air",
                     "uniqueIdentifier", "name", "version", "downloadURL", "downloadUrl", "type", "conditioning",
                     "defaultScheduler", "defaultSteps", "defaultCFG", "defaultStrength", "private", "tags",
                     "positiveTriggerWords"),
        **DELIVERY,
    },
    # Our extension (docs/protocol.md): no public page documents it.
    schema.ModelDownload: handled_by("tasks/model_download.py", "taskUUID", "model"),
}

# Fields accepted because the public API defines them, that only matter in a case this server refuses.
MOOT: dict[type[schema.Task], dict[str, str]] = {
    schema.ImageControlNetPreProcess: {
        "includeHandsAndFaceOpenPose": "openpose",  # the pre-processor it changes, refused (it needs weights)
    },
}

# The request fields of each task type's page in Runware's docs (taskType aside), by name.
DOCUMENTED: dict[str, set[str]] = {
    "imageInference": {
        "taskUUID", "outputType", "outputFormat", "outputQuality", "webhookURL", "deliveryMethod", "uploadEndpoint",
        "safety", "ttl", "includeCost", "positivePrompt", "negativePrompt", "seedImage", "maskImage", "maskMargin",
        "strength", "referenceImages", "outpaint", "height", "width", "model", "vae", "steps", "scheduler", "seed",
        "CFGScale", "clipSkip", "promptWeighting", "numberResults", "acceleration", "advancedFeatures",
        "acceleratorOptions", "puLID", "acePlusPlus", "refiner", "embeddings", "controlNet", "lora", "ipAdapters",
        "providerSettings",
    },
    "imageUpload": {"taskUUID", "image"},
    "modelSearch": {"taskUUID", "search", "tags", "category", "type", "architecture", "conditioning", "visibility",
                    "limit", "offset"},
    "getResponse": {"taskUUID"},
    "imageUpscale": {"taskUUID", "inputImage", "outputType", "outputFormat", "outputQuality", "webhookURL",
                     "deliveryMethod", "uploadEndpoint", "ttl", "includeCost", "model", "upscaleFactor", "settings"},
    "imageBackgroundRemoval": {"taskUUID", "inputImage", "outputType", "outputFormat", "outputQuality", "webhookURL",
                               "deliveryMethod", "uploadEndpoint", "ttl", "includeCost", "model", "settings"},
    "imageCaption": {"taskUUID", "inputImage", "webhookURL", "deliveryMethod", "includeCost", "model", "prompt"},
    "promptEnhance": {"taskUUID", "webhookURL", "deliveryMethod", "includeCost", "prompt", "promptMaxLength",
                      "promptVersions"},
    "imageControlNetPreProcess": {
        "taskUUID", "inputImage", "outputType", "outputFormat", "outputQuality", "webhookURL", "deliveryMethod",
        "uploadEndpoint", "ttl", "includeCost", "preProcessorType", "height", "width", "lowThresholdCanny",
        "highThresholdCanny", "includeHandsAndFaceOpenPose",
    },
    "imageMasking": {
        "taskUUID", "outputType", "outputFormat", "outputQuality", "webhookURL", "deliveryMethod", "uploadEndpoint",
        "ttl", "includeCost", "inputImage", "model", "confidence", "maxDetections", "maskPadding", "maskBlur",
    },
    # Its examples spell the URLs downloadUrl and heroImageUrl too.
    "modelUpload": {
        "taskUUID", "webhookURL", "deliveryMethod", "category", "type", "architecture", "conditioning", "format",
        "air", "uniqueIdentifier", "name", "version", "downloadURL", "downloadUrl", "defaultSteps",
        "defaultScheduler", "defaultCFG", "defaultStrength", "defaultWeight", "private", "heroImageURL",
        "heroImageUrl", "tags", "positiveTriggerWords", "negativeTriggerWords", "shortDescription", "comment",
    },
}


# The newer SDKs' spellings of a task type are the same task, documented on the same page.
for spelled, documented_as in (("upscale", "imageUpscale"), ("removeBackground", "imageBackgroundRemoval"),
                               ("caption", "imageCaption"), ("controlNetPreprocess", "imageControlNetPreProcess")):
    DOCUMENTED[spelled] = DOCUMENTED[documented_as]


def table_struct(struct: type[schema.Task]) -> type[schema.Task]:
    """The struct a spelling's struct subclasses (``Upscale`` → ``ImageUpscale``): one row for both."""
    return next(base for base in struct.__mro__ if base in HONOURED)


def fields(struct: type[schema.Task]) -> set[str]:
    return {field.name for field in msgspec.structs.fields(struct)}


@cache
def names_read(module: str) -> frozenset[str]:
    """Attributes read in ``module`` (``task.seed``) and strings it names (``getattr(task, "rgba")``)."""
    tree = ast.parse((ROOT / module).read_text())
    return frozenset({node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
                     | {node.value for node in ast.walk(tree)
                        if isinstance(node, ast.Constant) and isinstance(node.value, str)})


@pytest.mark.parametrize("task_type", sorted(SUPPORTED))
def test_every_accepted_field_is_in_the_table(task_type):
    struct = SUPPORTED[task_type].struct
    listed = set(HONOURED[table_struct(struct)]) | set(MOOT.get(table_struct(struct), {}))
    assert fields(struct) - listed == set(), "accepted, but nobody said what honours it"
    assert listed - fields(struct) == set(), "listed, but the struct no longer has it"


@pytest.mark.parametrize("struct", list(HONOURED), ids=lambda struct: struct.__name__)
def test_every_honoured_field_is_read_by_the_modules_named(struct):
    unread = [f"{field} in {module}" for field, modules in HONOURED[struct].items() for module in modules
              if field not in names_read(module)]
    assert unread == []


def test_the_schema_module_is_not_counted_as_a_reader():
    # Every field is named in schema.py; a table pointing there would prove nothing.
    assert all("tasks/schema.py" not in modules for table in HONOURED.values() for modules in table.values())


def test_moot_fields_belong_to_a_refused_case():
    for cases in MOOT.values():
        for refused in cases.values():
            assert guides.problem(guides.preprocessor_name(refused)) is not None, refused


@pytest.mark.parametrize("task_type", sorted(DOCUMENTED))
def test_every_documented_field_is_accepted_or_refused_by_name(task_type):
    accepted = fields(SUPPORTED[task_type].struct)
    refused = schema.UNSUPPORTED_PARAMETERS.get(task_type, frozenset())
    assert DOCUMENTED[task_type] - accepted - refused == set(), "documented, but unknown to this server"
    assert accepted & refused == set(), "both accepted and refused"


def decode_one(task: dict) -> protocol.Decoded:
    [decoded] = protocol.decode_frame(orjson.dumps([task]), max_tasks=10)
    return decoded


@pytest.mark.parametrize("task_type", sorted(task for task in schema.UNSUPPORTED_PARAMETERS
                                             if schema.UNSUPPORTED_PARAMETERS[task]))
def test_every_unsupported_field_is_refused_naming_it(task_type):
    for field in sorted(schema.UNSUPPORTED_PARAMETERS[task_type]):
        decoded = decode_one({"taskType": task_type, "taskUUID": str(uuid.uuid4()), field: 1})
        assert decoded.error is not None, field
        assert (decoded.error.code, decoded.error.parameter) == ("unsupportedParameter", field)


def test_a_field_no_task_defines_is_unknown_not_unsupported():
    # The other side of the line: a made-up key is unknownParameter, so the refusals above are by name.
    decoded = decode_one({"taskType": "modelSearch", "taskUUID": str(uuid.uuid4()), "heroImage": "x"})
    assert decoded.error is not None and decoded.error.code == "unknownParameter"
