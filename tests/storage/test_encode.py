from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from storage.encode import CONTENT_TYPES, EXTENSIONS, encode_image, to_base64, to_data_uri

PIL_FORMATS = {"JPG": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}


def gradient(size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", size)
    image.putdata([(x * 2 % 256, y * 3 % 256, (x + y) % 256) for y in range(size[1]) for x in range(size[0])])
    return image.convert(mode)


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("output_format", ["JPG", "PNG", "WEBP"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_encode_roundtrip(output_format: str, mode: str) -> None:
    data = encode_image(gradient(mode=mode), output_format, quality=90)
    decoded = decode(data)
    assert decoded.format == PIL_FORMATS[output_format]
    assert decoded.size == (96, 64)
    if output_format == "JPG":
        assert decoded.mode in ("RGB", "L")


def test_png_is_lossless() -> None:
    original = gradient()
    assert decode(encode_image(original, "PNG", quality=20)).tobytes() == original.tobytes()


def test_jpg_flattens_transparency_on_white() -> None:
    transparent = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    decoded = decode(encode_image(transparent, "JPG", quality=95))
    assert decoded.mode == "RGB"
    red, green, blue = decoded.getpixel((8, 8))  # type: ignore[misc]
    assert min(red, green, blue) > 245


def test_webp_keeps_alpha() -> None:
    half = Image.new("RGBA", (16, 16), (255, 0, 0, 128))
    assert decode(encode_image(half, "WEBP", quality=90)).mode == "RGBA"


def test_quality_changes_jpg_size() -> None:
    image = gradient((256, 256))
    assert len(encode_image(image, "JPG", quality=20)) < len(encode_image(image, "JPG", quality=99))


def test_unknown_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        encode_image(gradient(), "GIF", quality=90)


def test_tables_agree() -> None:
    assert set(EXTENSIONS.values()) == set(CONTENT_TYPES)


def test_base64_and_data_uri() -> None:
    data = encode_image(gradient(), "PNG", quality=90)
    assert base64.b64decode(to_base64(data)) == data
    uri = to_data_uri(data, "png")
    prefix, payload = uri.split(",", 1)
    assert prefix == "data:image/png;base64"
    assert base64.b64decode(payload) == data
    assert to_data_uri(b"x", "jpg").startswith("data:image/jpeg;base64,")
