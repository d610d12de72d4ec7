"""Uploads keep their pixels exactly and lose what is not the picture: EXIF (GPS), XMP, text, trailing bytes."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageChops
from PIL.PngImagePlugin import PngInfo

from imagewire.storage.inputs import decode_image, prepare_upload
from imagewire.storage.metadata import strip_jpeg, strip_png, strip_webp

TRAILER = b"TRAILING-SECRET" * 10
GPS = b"GPS-47.3769N-8.5417E"


def picture() -> Image.Image:
    image = Image.new("RGB", (64, 48))
    image.putdata([(x * 4, y * 5, (x + y) % 256) for y in range(48) for x in range(64)])
    return image


def with_exif(format: str) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"          # Make
    exif[0x9286] = GPS.decode()            # UserComment stands for location data
    buffer = io.BytesIO()
    if format == "PNG":
        info = PngInfo()
        info.add_text("Comment", GPS.decode())
        picture().save(buffer, format="PNG", pnginfo=info, exif=exif)
    else:
        picture().save(buffer, format=format, exif=exif, quality=90, **({"lossless": True} if format == "WEBP" else {}))
    return buffer.getvalue() + TRAILER


@pytest.mark.parametrize("format", ["JPEG", "PNG", "WEBP"])
async def test_an_upload_keeps_its_pixels_and_loses_its_metadata(format: str) -> None:
    data = with_exif(format)
    assert GPS in data and TRAILER in data
    image = decode_image(data, max_pixels=10_000, allowed_formats=frozenset({"JPEG", "PNG", "WEBP"}))
    stored, _ = await prepare_upload(image)
    assert GPS not in stored and TRAILER not in stored and b"Camera Maker" not in stored
    with Image.open(io.BytesIO(data)) as original, Image.open(io.BytesIO(stored)) as kept:
        assert kept.format == format and not kept.getexif()
        assert ImageChops.difference(original.convert("RGB"), kept.convert("RGB")).getbbox() is None


def test_each_stripper_refuses_what_it_cannot_walk() -> None:
    for strip, broken in ((strip_jpeg, b"\xff\xd8\xff\xe1\x00"), (strip_png, b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"),
                          (strip_webp, b"RIFF\xff\xff\xff\x00WEBP")):
        with pytest.raises(ValueError):
            strip(broken)


async def test_a_turned_photo_is_stored_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter clockwise
    buffer = io.BytesIO()
    picture().save(buffer, format="JPEG", exif=exif, quality=95)
    image = decode_image(buffer.getvalue(), max_pixels=10_000, allowed_formats=frozenset({"JPEG"}))
    assert (image.width, image.height, image.rotated) == (48, 64, True)
    stored, extension = await prepare_upload(image)
    with Image.open(io.BytesIO(stored)) as kept:
        assert kept.size == (48, 64) and not kept.getexif().get(0x0112)


def test_a_target_size_keeps_what_is_held_near_what_is_used() -> None:
    big = Image.new("RGB", (2000, 1600), (10, 200, 30))
    for format in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        big.save(buffer, format=format)
        image = decode_image(buffer.getvalue(), max_pixels=10_000_000, allowed_formats=frozenset({format}),
                             target=(128, 128))
        # The sent size is still known (a seed image without width/height takes it); what is held is far smaller.
        assert (image.width, image.height) == (2000, 1600)
        assert image.image.width * image.image.height <= 2000 * 1600 // 16
        assert min(image.image.size) >= 2 * 128
