"""Images at rest and in transit: the UUID-addressed store, input decoding, output encoding, URL fetching.

The ground floor: nothing here knows the wire protocol. Failures are :mod:`storage.errors
<imagewire.storage.errors>`, which the task layer turns into error items.
"""

from imagewire.storage.backend import ImageStorage
from imagewire.storage.encode import PNG_COMPRESS_LEVEL, encode_image, to_base64
from imagewire.storage.errors import FetchFailed, ImageNotStored, InputRejected, StorageError, StoreFailed
from imagewire.storage.fetch import UrlFetcher, is_forbidden_address
from imagewire.storage.formats import (
    FORMATS,
    INFERENCE_INPUTS,
    OUTPUT_FORMAT_NAMES,
    OUTPUT_FORMATS,
    STORED_BY_EXTENSION,
    UPLOAD_INPUTS,
    ImageFormat,
    output_format,
)
from imagewire.storage.inputs import InputImage, decode_image, prepare_upload, resolve_image_input
from imagewire.storage.store import ImageStore, SharedWrite, StoredImage, canonical_uuid

__all__ = [
    "FORMATS",
    "INFERENCE_INPUTS",
    "OUTPUT_FORMAT_NAMES",
    "OUTPUT_FORMATS",
    "PNG_COMPRESS_LEVEL",
    "STORED_BY_EXTENSION",
    "UPLOAD_INPUTS",
    "FetchFailed",
    "ImageFormat",
    "ImageNotStored",
    "ImageStorage",
    "ImageStore",
    "InputImage",
    "InputRejected",
    "SharedWrite",
    "StorageError",
    "StoreFailed",
    "StoredImage",
    "UrlFetcher",
    "canonical_uuid",
    "decode_image",
    "encode_image",
    "is_forbidden_address",
    "output_format",
    "prepare_upload",
    "resolve_image_input",
    "to_base64",
]
