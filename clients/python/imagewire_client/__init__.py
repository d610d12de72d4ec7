"""Python client for imagewire, the self-hosted image inference server speaking Runware's WebSocket API.

``Client`` is the asyncio client; ``SyncClient`` offers the same calls for code without an
event loop. Every refusal, from the server or the connection, raises ``ImagewireError``.
"""

from imagewire_client.client import DEFAULT_URL, Client
from imagewire_client.edits import ControlNet, Outpaint
from imagewire_client.errors import ImagewireError
from imagewire_client.images import ImageSource
from imagewire_client.results import (
    Detection,
    GuideImage,
    ImageResult,
    MaskImage,
    ModelDownloadResult,
    ModelInfo,
    TextResult,
    UploadedImage,
)
from imagewire_client.schema import Embedding, Lora, Refiner
from imagewire_client.sync import SyncClient

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "Client",
    "ControlNet",
    "Detection",
    "Embedding",
    "GuideImage",
    "ImageResult",
    "ImageSource",
    "ImagewireError",
    "MaskImage",
    "Lora",
    "ModelDownloadResult",
    "ModelInfo",
    "Outpaint",
    "Refiner",
    "SyncClient",
    "TextResult",
    "UploadedImage",
    "__version__",
]
