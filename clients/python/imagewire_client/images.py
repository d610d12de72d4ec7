"""Turn what a caller has (a file, bytes, a PIL image, a UUID, a URL) into an image field for the wire.

The server accepts four forms wherever a task takes an image: an image UUID, a data URI,
raw base64 and an http(s) URL. UUIDs, data URIs and URLs are passed through untouched
(the server fetches URLs itself); local content is sent inline as a data URI.
"""

from __future__ import annotations

import base64
import io
import os
import re
import sys
from pathlib import Path
from typing import Any, Union

from imagewire_client.errors import INVALID_IMAGE, ImagewireError

# A PIL image is accepted too; it is typed loosely so that pillow stays an optional extra.
ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

# Leading bytes of the formats the server decodes; the media type only labels the data URI.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def is_image_uuid(text: str) -> bool:
    return bool(_UUID.match(text))


def is_remote_reference(text: str) -> bool:
    """True for the forms the server resolves itself: an image UUID, a data URI, an http(s) URL."""
    lowered = text[:8].lower()
    return is_image_uuid(text) or lowered.startswith(("data:", "http://", "https://"))


def sniff_media_type(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for signature, media_type in _SIGNATURES:
        if data.startswith(signature):
            return media_type
    return None


def encode_bytes(data: bytes) -> str:
    """A data URI for recognised image bytes; raw base64 otherwise, so the server names the problem."""
    payload = base64.b64encode(data).decode("ascii")
    media_type = sniff_media_type(data)
    return f"data:{media_type};base64,{payload}" if media_type else payload


def _pil_image_type() -> type | None:
    # A caller who holds a PIL image has already imported PIL; never import it on our own.
    module = sys.modules.get("PIL.Image")
    return getattr(module, "Image", None) if module is not None else None


def _pil_to_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    # PNG is lossless and stores every mode PIL has except a few exotic ones, which are converted.
    if image.mode not in ("1", "L", "LA", "I", "P", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _read_file(path: Path, parameter: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImagewireError(
            INVALID_IMAGE,
            f"{parameter}: cannot read the file {str(path)!r} ({exc.strerror or exc}).",
            parameter=parameter,
        ) from exc


def image_field(source: ImageSource, parameter: str = "image") -> str:
    """The wire value for ``source``, for a task field named ``parameter``.

    Strings are an image UUID, a data URI, an http(s) URL, or else a local file path;
    ``Path`` objects are always files; bytes and PIL images are sent as data URIs.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return encode_bytes(bytes(source))
    if isinstance(source, str):
        if is_remote_reference(source):
            return source
        path = Path(source).expanduser()
        if not path.is_file():
            raise ImagewireError(
                INVALID_IMAGE,
                f"{parameter} {source!r} is not a file, an image UUID, a data URI or an http(s) URL.",
                parameter=parameter,
            )
        return encode_bytes(_read_file(path, parameter))
    if isinstance(source, os.PathLike):
        return encode_bytes(_read_file(Path(os.fspath(source)), parameter))
    pil_image = _pil_image_type()
    if pil_image is not None and isinstance(source, pil_image):
        return encode_bytes(_pil_to_bytes(source))
    raise ImagewireError(
        INVALID_IMAGE,
        f"{parameter} must be a path, bytes, a PIL image, an image UUID, a data URI or an http(s) URL; "
        f"got {type(source).__name__}.",
        parameter=parameter,
    )
