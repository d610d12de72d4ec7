"""Images as task inputs, in the four forms the public API accepts (PROTOCOL §7).

1. the imageUUID of an uploaded or generated image,
2. a data URI ``data:image/png;base64,...``,
3. raw base64,
4. an http(s) URL, fetched through :class:`storage.fetch.UrlFetcher`.

Whatever the form, the bytes are decoded in a worker thread, and the pixel count is checked
from the header before any pixel is decoded, so a small file that claims a huge image
(a decompression bomb) costs nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import re
import struct
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from imagewire.storage.backend import ImageStorage
from imagewire.storage.encode import encode_image, flatten_to_rgb
from imagewire.storage.errors import InputRejected, shown
from imagewire.storage.fetch import UrlFetcher
from imagewire.storage.formats import BY_PIL, FORMATS, OUTPUT_FORMATS
from imagewire.storage.metadata import STRIPPERS
from imagewire.storage.store import canonical_uuid

# PIL names multi-picture JPEGs (what many phone cameras write) MPO; to a client they are JPEG.
_FORMAT_ALIASES = {"MPO": "JPEG"}
# Only these decoders are ever tried: exotic formats are refused before a rarely exercised plugin parses them.
# (The JPEG decoder also opens MPO files.)
_DECODERS = [fmt.pil for fmt in FORMATS]
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)
_NOT_AN_IMAGE_INPUT = "is not an image UUID, a data URI, base64 data or an http(s) URL"


@dataclass(frozen=True)
class InputImage:
    image: Image.Image  # fully loaded, RGB, EXIF orientation applied; reduced when a target size was given
    format: str  # "PNG" | "JPEG" | "WEBP" | "BMP" | "GIF"
    data: bytes  # the original encoded bytes
    width: int   # of the picture as sent, upright
    height: int
    rotated: bool = False  # the file asked to be turned (EXIF orientation), and was


async def resolve_image_input(
    value: str,
    *,
    owner: str,
    store: ImageStorage,
    fetcher: UrlFetcher,
    max_pixels: int,
    max_bytes: int,
    allowed_formats: frozenset[str],
    target: tuple[int, int] | None = None,
) -> InputImage:
    """Decode an image given in any of the four forms; every failure is a StorageError. ``target``: see
    ``decode_image``."""
    data = await _load_bytes(value, owner=owner, store=store, fetcher=fetcher, max_bytes=max_bytes)
    return await asyncio.to_thread(decode_image, data, max_pixels=max_pixels, allowed_formats=allowed_formats,
                                   target=target)


async def _load_bytes(value: str, *, owner: str, store: ImageStorage, fetcher: UrlFetcher, max_bytes: int) -> bytes:
    if not isinstance(value, str) or not value.strip():
        raise InputRejected(
            f"must be an image UUID, a data URI, base64 data or an http(s) URL; received {shown(value)}")
    text = value.strip()
    if canonical_uuid(text) is not None:
        # Images this server stored itself were bounded when they were made; no size check here.
        return await store.read(await store.get(text, owner=owner))
    if text[:5].lower() == "data:":
        return await asyncio.to_thread(_decode_data_uri, text, max_bytes)
    scheme = _SCHEME.match(text)
    if scheme is not None:
        if scheme.group(1).lower() not in ("http", "https"):
            raise InputRejected(f"URL scheme must be http or https, received {shown(scheme.group(1))}")
        data = await fetcher.fetch(text)
        _check_size(len(data), max_bytes)
        return data
    return await asyncio.to_thread(_decode_base64, text, max_bytes, _NOT_AN_IMAGE_INPUT)


def _decode_data_uri(text: str, max_bytes: int) -> bytes:
    header, separator, payload = text.partition(",")
    media_type, *options = header[5:].split(";")
    if not separator or not media_type.lower().startswith("image/") or options[-1:] != ["base64"]:
        raise InputRejected(
            f"data URI must look like 'data:image/<format>;base64,<data>', received {shown(header + separator)}")
    return _decode_base64(payload, max_bytes, "data URI does not hold valid base64 data")


def _decode_base64(text: str, max_bytes: int, problem: str) -> bytes:
    compact = "".join(text.split())
    # Checked on the text, before decoding allocates anything: 4 characters carry 3 bytes.
    _check_size(len(compact) // 4 * 3, max_bytes)
    # Some clients leave out the padding; it carries no data.
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputRejected(f"{problem}; received {shown(text)}") from exc
    _check_size(len(data), max_bytes)
    return data


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise InputRejected(f"is {size} bytes, more than the {max_bytes} bytes allowed")


# EXIF orientations that turn the picture by a quarter: its upright width is the file's height.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112


def decode_image(data: bytes, *, max_pixels: int, allowed_formats: frozenset[str],
                 target: tuple[int, int] | None = None) -> InputImage:
    """Decode ``data`` into an RGB image (blocking: run it in a thread).

    With ``target`` (the size the caller will resize to), a larger picture is decoded straight to
    a smaller size where the format allows it (JPEG's DCT scaling) and reduced right after decoding
    otherwise, so that what is held is near the size that is used, not the size that was sent.
    """
    allowed = ", ".join(sorted(allowed_formats))
    try:
        # Lazy: reads the header only, so format and size are known before any pixel is decoded.
        opened = Image.open(io.BytesIO(data), formats=_DECODERS)
    except UnidentifiedImageError as exc:
        raise InputRejected(f"is not an image in an accepted format ({allowed})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own, far higher limit fired while reading the header (the warning arrives
        # as an exception where warnings are turned into errors).
        raise _too_many_pixels(max_pixels, None) from exc
    except _DECODE_ERRORS as exc:
        raise _undecodable(exc) from exc
    with opened:
        image_format = _FORMAT_ALIASES.get(str(opened.format), str(opened.format))
        if image_format not in allowed_formats:
            raise InputRejected(
                f"must be an image in one of the formats {allowed}, received a {image_format} image",
                allowed_values=sorted(allowed_formats))
        width, height = opened.size
        if width * height > max_pixels:
            raise _too_many_pixels(max_pixels, (width, height))
        try:
            orientation = opened.getexif().get(_ORIENTATION_TAG, 1)
            upright = (height, width) if orientation in _QUARTER_TURNS else (width, height)
            if target is not None:
                # JPEG decodes at 1/2, 1/4 or 1/8 where that still covers twice the target (see _reduced).
                wanted = (2 * target[0], 2 * target[1])
                opened.draft("RGB", wanted[::-1] if orientation in _QUARTER_TURNS else wanted)
            opened.load()  # for an animated GIF: the first frame
            image = flatten_to_rgb(ImageOps.exif_transpose(opened))
        except _DECODE_ERRORS as exc:
            raise _undecodable(exc) from exc
    if target is not None:
        image = _reduced(image, target)
    return InputImage(image=image, format=image_format, data=data, width=upright[0], height=upright[1],
                      rotated=orientation not in (None, 1))


def _reduced(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """The picture reduced by a whole factor while it stays at least twice ``target`` in both sides:
    cheap, and the caller's final resize from there keeps its quality."""
    factor = min(image.width // (2 * target[0]), image.height // (2 * target[1]))
    return image.reduce(factor) if factor >= 2 else image


def _too_many_pixels(max_pixels: int, size: tuple[int, int] | None) -> InputRejected:
    received = f"{size[0]}×{size[1]} = {size[0] * size[1]} pixels" if size else "an image far larger than that"
    return InputRejected(f"may have at most {max_pixels} pixels, received {received}")


def _undecodable(exc: Exception) -> InputRejected:
    reason = shown(str(exc) or type(exc).__name__, limit=120).strip("'\"")
    return InputRejected(f"could not be decoded: {reason}")


async def prepare_upload(image: InputImage, *, max_side: int = 2048) -> tuple[bytes, str]:
    """Bytes and extension to store for an upload: at most ``max_side`` px on the longer side, aspect kept.

    Original bytes are kept when they are already PNG/JPEG/WEBP and small enough; anything else
    is resized as needed and re-encoded as PNG (lossless, so no generation is lost).
    """
    return await asyncio.to_thread(_prepare_upload, image, max_side)


def _prepare_upload(image: InputImage, max_side: int) -> tuple[bytes, str]:
    longer = max(image.width, image.height)
    kept = BY_PIL[image.format]
    if kept.output and longer <= max_side and not image.rotated:
        # Stored as sent, pixel for pixel, less what is not the picture (EXIF, GPS, text, trailing bytes).
        with contextlib.suppress(ValueError):
            return STRIPPERS[image.format](image.data), kept.extension
    picture = image.image
    if longer > max_side:
        scale = max_side / longer
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    png = OUTPUT_FORMATS["PNG"]
    return encode_image(picture, png, quality=100), png.extension
