"""The wire schema: every task a client sends and every item the server answers.

This module is the single source of truth for message shapes. It imports nothing but
msgspec and the standard library, so the client library can carry an identical copy
(``clients/python/imagewire_client/schema.py``; a test keeps the two byte-identical).

Field names are spelled exactly as on the wire (``taskUUID``, ``CFGScale``): a
camel-case rename would get the acronyms wrong. Value limits live in ``Meta`` so that
they are visible in the exported JSON schema and enforced by the one decoder; nothing
else writes them down again (``Meta(extra={"code": ...})`` names the error code a
value out of range gets, where the public API has a specific one). Rules that involve
several fields or the model are checked by the task handlers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import Meta, Struct

UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

MAX_SEED = 9223372036854775807

TaskUUID = Annotated[str, Meta(pattern=UUID_PATTERN, description="UUID chosen by the client")]
Prompt = Annotated[str, Meta(min_length=2, max_length=3000)]
NegativePrompt = Annotated[str, Meta(max_length=3000)]
# Out of range or off the step, the error names the nearest valid sizes.
Width = Annotated[int, Meta(ge=128, le=2048, multiple_of=64, extra={"code": "invalidWidth"})]
Height = Annotated[int, Meta(ge=128, le=2048, multiple_of=64, extra={"code": "invalidHeight"})]
Strength = Annotated[float, Meta(gt=0, le=1)]
Steps = Annotated[int, Meta(ge=1, le=100)]
CFGScale = Annotated[float, Meta(ge=0, le=50)]
Seed = Annotated[int, Meta(ge=0, le=MAX_SEED)]
NumberResults = Annotated[int, Meta(ge=1, le=20)]
OutputQuality = Annotated[int, Meta(ge=20, le=99)]
OutputType = Literal["URL", "base64Data", "dataURI"]
DeliveryMethod = Literal["sync", "async"]
WebhookURL = Annotated[str, Meta(max_length=2048)]
# Of the tasks that make images (tasks/outputs.py): where each is PUT once stored, and seconds it is kept.
UploadEndpoint = Annotated[str, Meta(max_length=2048)]
# Seconds, from 60 (the docs' minimum) to the server's --image-ttl-days: both ends checked by the handler
# (tasks/outputs.py), so that a value out of range is told the whole range.
TTL = int
# Inpainting, outpainting and ControlNet (image-inference_inpainting.md, _outpainting.md, api-reference).
MaskMargin = Annotated[int, Meta(ge=32, le=128)]
OutpaintExtension = Annotated[int, Meta(ge=0, le=1920, multiple_of=64)]
OutpaintBlur = Annotated[int, Meta(ge=0, le=32)]
ControlNetWeight = Annotated[float, Meta(ge=0, le=1)]
ControlNetStep = Annotated[int, Meta(ge=1, le=100)]
ControlMode = Literal["balanced", "prompt", "controlnet"]
CannyThreshold = Annotated[int, Meta(ge=0, le=255)]
MAX_CONTROLNETS = 4


class Task(Struct, tag_field="taskType", forbid_unknown_fields=True, kw_only=True):
    """Base of every inbound task; the tag on the wire is ``taskType``."""


class Authentication(Task, tag="authentication"):
    apiKey: str | None = None
    connectionSessionUUID: str | None = None


class Ping(Task, tag="ping"):
    ping: bool = True


ModelAIR = Annotated[str, Meta(min_length=1, max_length=200)]
# LoRA and embedding strengths: negative values push away from what they learned.
AddOnWeight = Annotated[float, Meta(ge=-4, le=4)]
ClipSkip = Annotated[int, Meta(ge=0, le=2)]
# Matched case-insensitively by the handler (the Python SDK sends "sdembeds").
PromptWeighting = Annotated[str, Meta(max_length=20)]
MAX_ADD_ONS = 10  # LoRAs, and embeddings, per task


class Lora(Struct, forbid_unknown_fields=True, kw_only=True):
    model: ModelAIR
    weight: AddOnWeight = 1.0


class Embedding(Struct, forbid_unknown_fields=True, kw_only=True):
    model: ModelAIR
    weight: AddOnWeight = 1.0


# IP-Adapters: at most as many as LoRAs; each weight from 0 (no influence) to 1 (the docs' range and default).
IpAdapterWeight = Annotated[float, Meta(ge=0, le=1)]


class IpAdapter(Struct, forbid_unknown_fields=True, kw_only=True):
    """One IP-Adapter of ``ipAdapters``: its model, the picture that guides it (four input forms), its weight."""

    model: ModelAIR
    guideImage: str
    weight: IpAdapterWeight | None = None  # null: 1, as the Python SDK sends unset fields


class Refiner(Struct, forbid_unknown_fields=True, kw_only=True):
    """An SDXL refiner finishes the image from a step on; give one of the two (default: 80 %)."""

    model: ModelAIR
    startStep: Annotated[int, Meta(ge=2, le=100)] | None = None
    startStepPercentage: Annotated[float, Meta(ge=1, le=99)] | None = None


class Deliverable(Task, kw_only=True):
    """A task whose results can come back later: ``deliveryMethod: "async"`` acknowledges it at once,
    and its results are fetched with getResponse (and POSTed to ``webhookURL`` when one is given)."""

    deliveryMethod: DeliveryMethod = "sync"
    webhookURL: WebhookURL | None = None


class ImageInference(Deliverable, tag="imageInference"):
    taskUUID: TaskUUID
    model: Annotated[str, Meta(min_length=1, max_length=200)]
    positivePrompt: Prompt
    negativePrompt: NegativePrompt | None = None
    width: Width | None = None
    height: Height | None = None
    seedImage: str | None = None
    strength: Strength = 0.8
    steps: Steps | None = None
    CFGScale: CFGScale | None = None
    scheduler: Annotated[str, Meta(max_length=100)] | None = None
    seed: Seed | None = None
    numberResults: NumberResults = 1
    outputType: OutputType | list[OutputType] = "URL"
    outputFormat: Annotated[str, Meta(max_length=10)] = "JPG"
    outputQuality: OutputQuality = 95
    includeCost: bool = False
    # Extensions (docs/protocol.md): progress items pushed while the task runs, with small previews.
    includeProgress: bool = False
    includePreview: bool = False
    checkNSFW: bool = False
    safety: dict[str, Any] | None = None
    lora: Annotated[list[Lora], Meta(max_length=MAX_ADD_ONS)] | None = None
    embeddings: Annotated[list[Embedding], Meta(max_length=MAX_ADD_ONS)] | None = None
    vae: ModelAIR | None = None
    clipSkip: ClipSkip | None = None
    promptWeighting: PromptWeighting | None = None
    usePromptWeighting: bool | None = None  # the JS SDK's older switch: true means "compel"
    refiner: Refiner | None = None
    maskImage: str | None = None
    maskMargin: MaskMargin | None = None
    outpaint: Outpaint | None = None
    controlNet: Annotated[list[ControlNet], Meta(max_length=MAX_CONTROLNETS)] | None = None
    uploadEndpoint: UploadEndpoint | None = None
    ttl: TTL | None = None
    # FLUX.1 Kontext's input images, in the four forms; how many a model takes, tasks/references.py checks.
    referenceImages: list[str] | None = None
    # The newer SDK's spelling of the input images: {"seedImage", "maskImage", "referenceImages"}
    # (tasks/image_inference.py folds it into the fields above).
    inputs: dict[str, Any] | None = None
    ipAdapters: Annotated[list[IpAdapter], Meta(max_length=MAX_ADD_ONS)] | None = None
    # Step caching (tasks/acceleration.py): a preset, and options that override it field by field.
    acceleration: Literal["none", "low", "medium", "high"] | None = None
    acceleratorOptions: AcceleratorOptions | None = None


class AcceleratorOptions(Struct, forbid_unknown_fields=True, kw_only=True):
    """Step caching: TeaCache-style for the transformer families, DeepCache for the UNet ones. ``None`` is
    "not sent", so an ``acceleration`` preset's value stands; the documented defaults apply in the handler."""

    teaCache: bool | None = None
    teaCacheDistance: Annotated[float, Meta(ge=0, le=1)] | None = None
    deepCache: bool | None = None
    deepCacheInterval: Annotated[int, Meta(ge=1, le=100)] | None = None
    deepCacheBranchId: Annotated[int, Meta(ge=0, le=10)] | None = None
    # Against the task's steps (and one another) in the handler; here only what holds for any steps.
    cacheStartStep: Annotated[int, Meta(ge=0, le=100)] | None = None
    cacheStartStepPercentage: Annotated[int, Meta(ge=0, le=99)] | None = None
    cacheEndStep: Annotated[int, Meta(ge=1, le=100)] | None = None
    cacheEndStepPercentage: Annotated[int, Meta(ge=1, le=100)] | None = None
    cacheMaxConsecutiveSteps: Annotated[int, Meta(ge=1, le=5)] | None = None


class Outpaint(Struct, forbid_unknown_fields=True, kw_only=True):
    """Pixels to add on each side of the seed image (``null`` counts as 0), and the mask's soft edge."""

    top: OutpaintExtension | None = None
    right: OutpaintExtension | None = None
    bottom: OutpaintExtension | None = None
    left: OutpaintExtension | None = None
    blur: OutpaintBlur | None = None


class ControlNet(Struct, forbid_unknown_fields=True, kw_only=True):
    """One ControlNet of ``controlNet``. Every optional field may be ``null`` (the Python SDK sends them so)."""

    model: Annotated[str, Meta(min_length=1, max_length=200)]
    guideImage: str
    weight: ControlNetWeight | None = None
    startStep: ControlNetStep | None = None
    endStep: ControlNetStep | None = None
    startStepPercentage: Annotated[int, Meta(ge=0, le=99)] | None = None
    endStepPercentage: Annotated[int, Meta(ge=1, le=100)] | None = None
    controlMode: ControlMode | None = None
    # The Python SDK's IControlNetCanny / IControlNetOpenPose: pre-process guideImage first.
    preprocessor: Annotated[str, Meta(max_length=50)] | None = None
    lowThresholdCanny: CannyThreshold | None = None
    highThresholdCanny: CannyThreshold | None = None
    includeHandsAndFaceOpenPose: bool | None = None


class ImageUpload(Deliverable, tag="imageUpload"):
    taskUUID: TaskUUID
    image: str


class GetResponse(Task, tag="getResponse"):
    taskUUID: TaskUUID


class CancelTask(Task, tag="cancelTask"):
    """Extension: stop the task with this taskUUID (sent by the same API key)."""

    taskUUID: TaskUUID


class ImageHistory(Task, tag="imageHistory"):
    """Extension: this API key's newest images, newest first (on local disk: stored since the server started)."""

    taskUUID: TaskUUID
    limit: Annotated[int, Meta(ge=1, le=200)] = 50


# modelSearch's documented values (utilities_model-search.md): checkpoint types and ControlNet conditionings.
ModelType = Literal["base", "inpainting", "refiner"]
Conditioning = Literal[
    "blur", "canny", "depth", "gray", "hed", "inpaint", "inpaintdepth", "lineart", "lowquality", "normal",
    "openmlsd", "openpose", "outfit", "pix2pix", "qrcode", "scribble", "seg", "shuffle", "sketch", "softedge",
    "tile"]
CONDITIONINGS: tuple[str, ...] = get_args(Conditioning)


class ModelSearch(Deliverable, tag="modelSearch"):
    taskUUID: TaskUUID
    search: Annotated[str, Meta(max_length=200)] | None = None
    tags: list[str] | None = None
    category: str | None = None
    type: ModelType | None = None
    # Ours (air_registry/architectures.py) or the public API's names; checked in prepare, where both are known.
    architecture: Annotated[str, Meta(max_length=100)] | None = None
    conditioning: Conditioning | None = None
    visibility: Literal["public", "private", "all"] | None = None
    limit: Annotated[int, Meta(ge=1, le=100)] = 20
    offset: Annotated[int, Meta(ge=0)] = 0


# ---------------------------------------------------------------- tools: upscale, background removal, caption,
# prompt enhance. Each image tool takes its image as ``inputImage`` (older clients) or ``inputs.image`` (newer
# ones); ``model`` is optional, the catalog names each task type's default model.

ModelName = Annotated[str, Meta(min_length=1, max_length=200)]
# Both inputs are the four image forms; which one a task uses, and that it has one, its handler checks.
ImageInputs = dict[str, Any]
UpscaleFactor = Annotated[float, Meta(ge=2, le=4)]
ColourChannel = Annotated[int, Meta(ge=0, le=255)]
Opacity = Annotated[float, Meta(ge=0, le=1)]
# [red, green, blue, alpha]: the colour that replaces the background; alpha 0 is transparent, 1 opaque.
RGBA = tuple[ColourChannel, ColourChannel, ColourChannel, Opacity]
MattingLevel = Annotated[int, Meta(ge=1, le=255)]
PromptMaxLength = Annotated[int, Meta(ge=12, le=400)]
PromptVersions = Annotated[int, Meta(ge=1, le=5)]


class ImageUpscale(Deliverable, tag="imageUpscale"):
    taskUUID: TaskUUID
    upscaleFactor: UpscaleFactor
    inputImage: str | None = None
    inputs: ImageInputs | None = None
    model: ModelName | None = None
    outputType: OutputType | list[OutputType] = "URL"
    outputFormat: Annotated[str, Meta(max_length=10)] = "JPG"
    outputQuality: OutputQuality = 95
    includeCost: bool = False
    uploadEndpoint: UploadEndpoint | None = None
    ttl: TTL | None = None


class Upscale(ImageUpscale, tag="upscale"):
    """imageUpscale as the JavaScript SDK and the newer API spell it."""


class BackgroundRemovalSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    rgba: RGBA | None = None
    postProcessMask: bool | None = None
    returnOnlyMask: bool | None = None
    alphaMatting: bool | None = None
    alphaMattingForegroundThreshold: MattingLevel | None = None
    alphaMattingBackgroundThreshold: MattingLevel | None = None
    alphaMattingErodeSize: MattingLevel | None = None


class ImageBackgroundRemoval(Deliverable, tag="imageBackgroundRemoval"):
    taskUUID: TaskUUID
    inputImage: str | None = None
    inputs: ImageInputs | None = None
    model: ModelName | None = None
    outputType: OutputType | list[OutputType] = "URL"
    outputFormat: Annotated[str, Meta(max_length=10)] = "PNG"
    outputQuality: OutputQuality = 95
    includeCost: bool = False
    settings: BackgroundRemovalSettings | None = None
    # The official Python SDK sends the fields of ``settings`` at the top level of the task.
    rgba: RGBA | None = None
    postProcessMask: bool | None = None
    returnOnlyMask: bool | None = None
    alphaMatting: bool | None = None
    alphaMattingForegroundThreshold: MattingLevel | None = None
    alphaMattingBackgroundThreshold: MattingLevel | None = None
    alphaMattingErodeSize: MattingLevel | None = None
    uploadEndpoint: UploadEndpoint | None = None
    ttl: TTL | None = None


class RemoveBackground(ImageBackgroundRemoval, tag="removeBackground"):
    """imageBackgroundRemoval as the JavaScript SDK and the newer API spell it."""


class ImageCaption(Deliverable, tag="imageCaption"):
    taskUUID: TaskUUID
    inputImage: str | None = None
    inputs: ImageInputs | None = None
    model: ModelName | None = None
    # What the caption should start with; the official Python SDK sends a list of strings.
    prompt: Annotated[str, Meta(max_length=300)] | list[Annotated[str, Meta(max_length=300)]] | None = None
    includeCost: bool = False


class Caption(ImageCaption, tag="caption"):
    """imageCaption as the JavaScript SDK and the newer API spell it."""


class PromptEnhance(Deliverable, tag="promptEnhance"):
    taskUUID: TaskUUID
    prompt: Annotated[str, Meta(min_length=1, max_length=300)]
    promptMaxLength: PromptMaxLength   # in the model's tokens, the enhanced prompt as a whole
    promptVersions: PromptVersions
    model: ModelName | None = None
    seed: Seed | None = None           # absent: one derived from the request, so it repeats
    includeCost: bool = False


# ---------------------------------------------------------------- ControlNet guide images


class ImageControlNetPreProcess(Deliverable, tag="imageControlNetPreProcess"):
    """A guide image from an input image (tasks/controlnet_preprocess.py).

    The older shape names the pre-processor in ``preProcessorType`` and the image in ``inputImage``;
    the newer one in ``model`` (``runware:controlnet-preprocess@canny``) and ``inputs.image``.
    """

    taskUUID: TaskUUID
    inputImage: str | None = None
    inputs: ImageInputs | None = None
    preProcessorType: Annotated[str, Meta(max_length=50)] | None = None
    model: Annotated[str, Meta(max_length=200)] | None = None
    width: Annotated[int, Meta(ge=1, le=2048)] | None = None
    height: Annotated[int, Meta(ge=1, le=2048)] | None = None
    lowThresholdCanny: CannyThreshold = 100
    highThresholdCanny: CannyThreshold = 200
    includeHandsAndFaceOpenPose: bool = False
    outputType: OutputType | list[OutputType] = "URL"
    outputFormat: Annotated[str, Meta(max_length=10)] = "JPG"
    outputQuality: OutputQuality = 95
    includeCost: bool = False
    uploadEndpoint: UploadEndpoint | None = None
    ttl: TTL | None = None


class ControlNetPreprocess(ImageControlNetPreProcess, tag="controlNetPreprocess"):
    """imageControlNetPreProcess as the newer official SDKs spell it."""


# ---------------------------------------------------------------- imageMasking (tools_image-masking.md)

DetectionConfidence = Annotated[float, Meta(ge=0, le=1)]
MaxDetections = Annotated[int, Meta(ge=1, le=20)]
# Pixels. The page gives no largest value; these bound the work of drawing the mask, and both are far past
# any picture this server takes (2048 pixels a side for its images, 4096 for inputs).
MaskPadding = Annotated[int, Meta(ge=0, le=4096)]
MaskBlur = Annotated[int, Meta(ge=0, le=256)]


class MaskingSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """The detection settings as the newer SDKs send them, inside ``settings``."""

    confidence: DetectionConfidence | None = None
    maxDetections: MaxDetections | None = None
    maskPadding: MaskPadding | None = None
    maskBlur: MaskBlur | None = None


class ImageMasking(Deliverable, tag="imageMasking"):
    """A mask of the faces, hands or people in a picture (tasks/image_masking.py). ``model`` names what is
    detected (``runware:35@1`` faces, …); the settings come at the top level (the page's shape) or in
    ``settings`` (the newer SDKs'); ``None`` is "not sent", the page's defaults apply in the handler."""

    taskUUID: TaskUUID
    model: ModelName
    inputImage: str | None = None
    inputs: ImageInputs | None = None
    confidence: DetectionConfidence | None = None
    maxDetections: MaxDetections | None = None
    maskPadding: MaskPadding | None = None
    maskBlur: MaskBlur | None = None
    settings: MaskingSettings | None = None
    outputType: OutputType | list[OutputType] = "URL"
    outputFormat: Annotated[str, Meta(max_length=10)] = "JPG"
    outputQuality: OutputQuality = 95
    includeCost: bool = False
    uploadEndpoint: UploadEndpoint | None = None
    ttl: TTL | None = None


# modelUpload (image-inference_model-upload.md): a model file fetched from a URL into the catalog. Which
# categories, architectures and values fit together is checked by its handler (tasks/model_upload.py).
UploadCategory = Literal["checkpoint", "lora", "lycoris", "controlnet", "vae", "embeddings"]
DownloadURL = Annotated[str, Meta(min_length=1, max_length=8192)]
TriggerWord = Annotated[str, Meta(max_length=100)]


class ModelUpload(Deliverable, tag="modelUpload"):
    taskUUID: TaskUUID
    category: UploadCategory
    architecture: Annotated[str, Meta(max_length=100)]
    format: Literal["safetensors"]
    air: ModelAIR
    uniqueIdentifier: Annotated[str, Meta(min_length=1, max_length=200)]
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    version: Annotated[str, Meta(min_length=1, max_length=100)]
    # The public page spells it both ways (downloadUrl in its ControlNet example).
    downloadURL: DownloadURL | None = None
    downloadUrl: DownloadURL | None = None
    type: Literal["base", "inpainting", "refiner", "positive", "negative"] | None = None
    conditioning: Conditioning | None = None
    defaultScheduler: Annotated[str, Meta(max_length=100)] | None = None
    defaultSteps: Steps | None = None
    defaultCFG: Annotated[float, Meta(ge=0, le=30)] | None = None
    defaultStrength: Annotated[float, Meta(ge=0, le=1)] | None = None
    private: bool | None = None
    tags: Annotated[list[Annotated[str, Meta(max_length=400)]], Meta(max_length=100)] | None = None
    # An embedding's token, the word that stands for it in prompts (what modelSearch answers in this field); the
    # page lists it as an array and its LoRA example as a string: one word either way.
    positiveTriggerWords: TriggerWord | Annotated[list[TriggerWord], Meta(max_length=10)] | None = None


class ModelDownload(Task, tag="modelDownload"):
    """Extension (docs/protocol.md): fetch a catalog model's files from the Hugging Face hub into this server's
    cache, with progress; needs --allow-downloads."""

    taskUUID: TaskUUID
    model: ModelAIR


AnyTask = (Authentication | Ping | ImageInference | ImageUpload | GetResponse | ModelSearch
           | ImageUpscale | Upscale | ImageBackgroundRemoval | RemoveBackground | ImageCaption | Caption
           | PromptEnhance | CancelTask | ImageHistory | ImageControlNetPreProcess
           | ControlNetPreprocess | ModelUpload | ModelDownload | ImageMasking)

# Parameters the public API defines for a task type that this server does not implement yet.
# They are answered with ``unsupportedParameter`` by name, never silently ignored; any other
# key that is not a field of the struct is answered with ``unknownParameter``.
UNSUPPORTED_PARAMETERS: dict[str, frozenset[str]] = {
    "imageInference": frozenset(
        {
            "advancedFeatures", "puLID", "acePlusPlus",
            "photoMaker", "instantID", "layerDiffuse", "outputs",
            "providerSettings", "settings", "frameImages", "resolution", "batchSize",
            "vectorize", "teaCache", "fbCache", "deepCache", "cacheStartStep", "cacheEndStep",
            "lycoris", "useCache", "upscaleFactor", "ultralytics", "extraArgs",
        }
    ),
    "imageUpload": frozenset(),
    "modelSearch": frozenset(),
    "getResponse": frozenset(),
    **dict.fromkeys(("imageUpscale", "upscale"), frozenset(
        {"settings", "targetMegapixels", "providerSettings", "safety"})),
    **dict.fromkeys(("imageBackgroundRemoval", "removeBackground"), frozenset(
        {"providerSettings", "safety", "inputImages"})),
    **dict.fromkeys(("imageCaption", "caption"), frozenset({"inputImages", "template", "structuredData"})),
    "promptEnhance": frozenset(),
    **dict.fromkeys(("imageControlNetPreProcess", "controlNetPreprocess"), frozenset()),
    "imageMasking": frozenset(),
    # What modelSearch has no place for, or this server no meaning: a preview image, descriptions, negative
    # trigger words, a LoRA's default weight (a request's weight defaults to 1).
    "modelUpload": frozenset({"heroImageURL", "heroImageUrl", "shortDescription", "comment",
                              "negativeTriggerWords", "defaultWeight"}),
}

# ---------------------------------------------------------------- answers


class Item(Struct, omit_defaults=True, kw_only=True):
    """Base of every outbound item; ``None`` fields are left off the wire."""

    taskType: str


class AuthenticationResult(Item):
    connectionSessionUUID: str


class Pong(Item):
    pong: bool  # no default: omit_defaults would leave a default True off the wire


class ImageResult(Item):
    taskUUID: str
    imageUUID: str
    seed: int | None = None
    imageURL: str | None = None
    imageBase64Data: str | None = None
    imageDataURI: str | None = None
    cost: float | None = None
    NSFWContent: bool | None = None
    status: str | None = None
    inputImageUUID: str | None = None   # of the tools that transform an image (upscale, background removal)
    uploaded: bool | None = None        # with uploadEndpoint: whether the PUT to it succeeded


class TextResult(Item):
    """A caption, or one version of an enhanced prompt."""

    taskUUID: str
    text: str
    cost: float | None = None


class GuideImageResult(Item):
    taskUUID: str
    guideImageUUID: str
    inputImageUUID: str | None = None
    guideImageURL: str | None = None
    guideImageBase64Data: str | None = None
    guideImageDataURI: str | None = None
    cost: float | None = None
    uploaded: bool | None = None        # with uploadEndpoint: whether the PUT to it succeeded


class Detection(Struct, kw_only=True):
    """One detected face, hand or person: its box's edges in pixels of the input (the box covers
    ``x_min <= x < x_max``, ``y_min <= y < y_max``), and the detector's score (an addition to the page's fields)."""

    x_min: int
    y_min: int
    x_max: int
    y_max: int
    confidence: float


class MaskImageResult(Item):
    taskUUID: str
    maskImageUUID: str
    detections: list[Detection]
    inputImageUUID: str | None = None
    maskImageURL: str | None = None
    maskImageBase64Data: str | None = None
    maskImageDataURI: str | None = None
    cost: float | None = None
    uploaded: bool | None = None        # with uploadEndpoint: whether the PUT to it succeeded


class UploadResult(Item):
    taskUUID: str
    imageUUID: str
    imageURL: str


class Acknowledgement(Item):
    taskUUID: str


class Progress(Item):
    """A task's progress: never a result (no imageUUID, no image), so clients that count results by
    imageUUID or by an image field are not misled. Pushed only to tasks that ask (includeProgress)."""

    taskUUID: str
    progress: int                   # percent, 0 to 100
    status: str                     # "processing" (no default: omit_defaults would leave it off the wire)
    resultIndex: int | None = None  # which of the task's images, 0-based
    step: int | None = None
    steps: int | None = None
    queuePosition: int | None = None  # while waiting: how many jobs run before this one
    preview: str | None = None      # a small JPEG data URI of the image so far


class HistoryImage(Struct, kw_only=True):
    imageUUID: str
    imageURL: str


class ImageHistoryResult(Item):
    taskUUID: str
    images: list[HistoryImage]


class Cancellation(Item):
    taskUUID: str
    cancelled: bool   # false: the task had already ended
    status: str       # the task's status now: error (cancelled) or how it ended


class ModelInfo(Struct, kw_only=True):
    air: str
    name: str
    version: str
    category: str
    architecture: str
    tags: list[str]
    private: bool
    defaultWidth: int
    defaultHeight: int
    defaultSteps: int
    defaultScheduler: str
    defaultCFG: float
    defaultStrength: float
    aliases: list[str] = []
    available: bool = True
    comment: str = ""
    positiveTriggerWords: str = ""  # an embedding's token: what stands for it in prompts
    loaded: bool = False            # in memory now: a request for it starts without a load from disk
    loadedOn: Literal["device", "ram"] | None = None
    type: ModelType | None = None          # of a checkpoint; null for other categories
    conditioning: str | None = None        # of a ControlNet, where its tags say it; null otherwise
    heroImage: str | None = None           # no catalog model has a preview image: always null
    memoryPlan: str | None = None   # a loaded model's placement: all-on-device, text-encoders-on-cpu, model-offload, …
    # Extensions: how a loaded model's weights were quantized on load (int8, float8) and the bytes that saved
    # against its own precision; null when they were not.
    quantization: str | None = None
    quantizationSavedBytes: int | None = None
    # Extension: missing from the cache, and modelDownload would fetch it (a hub model, --allow-downloads).
    downloadable: bool = False


class ModelSearchResult(Item):
    taskUUID: str
    totalResults: int
    results: list[ModelInfo]


class ModelUploadResult(Item):
    """One phase of a modelUpload done: validated, downloaded, optimized, stored, ready."""

    taskUUID: str
    status: str
    message: str
    air: str


class ModelDownloadResult(Item):
    """How far a modelDownload has got: ``downloading`` items as bytes arrive, then ``ready``."""

    taskUUID: str
    air: str
    status: str
    bytesDone: int
    bytesTotal: int


class Envelope(Struct, omit_defaults=True, kw_only=True):
    """What one frame from the server carries."""

    data: list[dict[str, Any]] | None = None
    errors: list[dict[str, Any]] | None = None


def json_schema() -> dict[str, Any]:
    """The JSON schema of every inbound task, for docs and for snapshot tests."""
    _, components = msgspec.json.schema_components([AnyTask])
    return components
