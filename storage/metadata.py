"""Taking what is not the picture out of an uploaded file, without decoding the picture: EXIF (camera,
GPS position, time), XMP, text chunks, comments, and any bytes after the image's end.

Uploads are stored as they came when they are PNG, JPEG or WEBP and small enough, so their pixels
stay exactly as sent; this walks the container (JPEG segments, PNG chunks, RIFF chunks) and keeps only
what describes pixels and colour (an ICC profile stays). Each function raises ValueError on a file it
cannot walk; the caller then re-encodes the image instead.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable

# JPEG: APP0 (JFIF) and APP14 (Adobe) say how to read the data; APP2 is kept when it holds an ICC
# profile (colour), not when it indexes the further pictures of a multi-picture file (MPF).
_JPEG_KEPT_APPS = {0xE0, 0xEE}
_ICC_PROFILE = b"ICC_PROFILE\x00"
# PNG chunks that describe pixels or colour; everything else ancillary (tEXt, zTXt, iTXt, eXIf, tIME…) goes.
_PNG_KEPT = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT",
             b"pHYs", b"bKGD", b"acTL", b"fcTL", b"fdAT"}
_WEBP_DROPPED = {b"EXIF", b"XMP "}
_VP8X_EXIF_AND_XMP = 0x08 | 0x04


def _strip_jpeg(data: bytes) -> bytes:
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    out, position = bytearray(b"\xff\xd8"), 2
    while True:
        marker, position = _next_marker(data, position)
        if marker == 0xD9:  # EOI: whatever follows is not the picture
            out += b"\xff\xd9"
            return bytes(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn and TEM carry no length
            out += bytes((0xFF, marker))
            continue
        length = struct.unpack(">H", data[position : position + 2])[0]
        segment = data[position - 2 : position + length]
        if len(segment) < length + 2:
            raise ValueError("truncated JPEG segment")
        position += length
        if marker == 0xDA:  # SOS: the header, then entropy-coded data up to the next real marker
            out += segment
            end = _end_of_scan(data, position)
            out += data[position:end]
            position = end
        elif _kept_jpeg_segment(marker, segment[4:]):
            out += segment


def _kept_jpeg_segment(marker: int, payload: bytes) -> bool:
    """Everything that describes the picture; not EXIF, XMP, IPTC, MPF (APPn) or comments (COM)."""
    if marker == 0xE2:
        return payload.startswith(_ICC_PROFILE)
    if 0xE0 <= marker <= 0xEF:
        return marker in _JPEG_KEPT_APPS
    return marker != 0xFE


def _next_marker(data: bytes, position: int) -> tuple[int, int]:
    if data[position : position + 1] != b"\xff":
        raise ValueError("expected a JPEG marker")
    while data[position : position + 1] == b"\xff":  # fill bytes
        position += 1
    if position >= len(data):
        raise ValueError("truncated JPEG")
    return data[position], position + 1


def _end_of_scan(data: bytes, position: int) -> int:
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            raise ValueError("JPEG scan without an end")
        follower = data[position + 1]
        if follower == 0x00 or 0xD0 <= follower <= 0xD7 or follower == 0xFF:
            position += 1  # stuffed byte, restart marker or fill: still scan data
            continue
        return position


def _strip_png(data: bytes) -> bytes:
    signature = b"\x89PNG\r\n\x1a\n"
    if not data.startswith(signature):
        raise ValueError("not a PNG")
    out, position = bytearray(signature), len(signature)
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunk = data[position : position + 12 + length]
        if len(chunk) < 12 + length:
            raise ValueError("truncated PNG chunk")
        if kind in _PNG_KEPT:
            out += chunk
        position += 12 + length
        if kind == b"IEND":
            return bytes(out)
    raise ValueError("PNG without IEND")


def _strip_webp(data: bytes) -> bytes:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("not a WEBP")
    end = 8 + struct.unpack("<I", data[4:8])[0]
    if end > len(data):
        raise ValueError("truncated WEBP")
    chunks, position = [], 12
    while position + 8 <= end:
        kind, length = data[position : position + 4], struct.unpack("<I", data[position + 4 : position + 8])[0]
        chunk = bytearray(data[position : position + 8 + length + (length & 1)])
        if kind == b"VP8X":
            chunk[8] &= ~_VP8X_EXIF_AND_XMP & 0xFF  # the flags no longer promise EXIF or XMP chunks
        if kind not in _WEBP_DROPPED:
            chunks.append(bytes(chunk))
        position += 8 + length + (length & 1)
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _walking(strip: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """A truncated or malformed container ends the walk with ValueError, however it shows."""
    @functools.wraps(strip)
    def walk(data: bytes) -> bytes:
        try:
            return strip(data)
        except (struct.error, IndexError) as exc:
            raise ValueError(f"malformed file: {exc}") from exc
    return walk


strip_jpeg, strip_png, strip_webp = _walking(_strip_jpeg), _walking(_strip_png), _walking(_strip_webp)
STRIPPERS: dict[str, Callable[[bytes], bytes]] = {"JPEG": strip_jpeg, "PNG": strip_png, "WEBP": strip_webp}
