"""Images at rest and in transit: the UUID-addressed store, input decoding, output encoding, URL fetching."""

from storage.encode import CONTENT_TYPES, EXTENSIONS, PNG_COMPRESS_LEVEL, encode_image, to_base64, to_data_uri
from storage.fetch import UrlFetcher, is_forbidden_address
from storage.inputs import (
    INFERENCE_FORMATS,
    UPLOAD_FORMATS,
    InputImage,
    decode_image,
    prepare_upload,
    resolve_image_input,
)
from storage.store import ImageStore, StoredImage, canonical_uuid

__all__ = [
    "CONTENT_TYPES",
    "EXTENSIONS",
    "INFERENCE_FORMATS",
    "PNG_COMPRESS_LEVEL",
    "UPLOAD_FORMATS",
    "ImageStore",
    "InputImage",
    "StoredImage",
    "UrlFetcher",
    "canonical_uuid",
    "decode_image",
    "encode_image",
    "is_forbidden_address",
    "prepare_upload",
    "resolve_image_input",
    "to_base64",
    "to_data_uri",
]
