from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from imagewire.storage.encode import encode_image, to_base64
from imagewire.storage.formats import FORMATS, OUTPUT_FORMATS, STORED_BY_EXTENSION, output_format

PIL_FORMATS = {"JPG": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}
JPG, PNG, WEBP = OUTPUT_FORMATS["JPG"], OUTPUT_FORMATS["PNG"], OUTPUT_FORMATS["WEBP"]


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
    data = encode_image(gradient(mode=mode), OUTPUT_FORMATS[output_format], quality=90)
    decoded = decode(data)
    assert decoded.format == PIL_FORMATS[output_format]
    assert decoded.size == (96, 64)
    if output_format == "JPG":
        assert decoded.mode in ("RGB", "L")


def test_png_is_lossless() -> None:
    original = gradient()
    assert decode(encode_image(original, PNG, quality=20)).tobytes() == original.tobytes()


def test_jpg_flattens_transparency_on_white() -> None:
    transparent = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    decoded = decode(encode_image(transparent, JPG, quality=95))
    assert decoded.mode == "RGB"
    red, green, blue = decoded.getpixel((8, 8))  # type: ignore[misc]
    assert min(red, green, blue) > 245


def test_webp_keeps_alpha() -> None:
    half = Image.new("RGBA", (16, 16), (255, 0, 0, 128))
    assert decode(encode_image(half, WEBP, quality=90)).mode == "RGBA"


def test_quality_changes_jpg_size() -> None:
    image = gradient((256, 256))
    assert len(encode_image(image, JPG, quality=20)) < len(encode_image(image, JPG, quality=99))


def test_an_input_only_format_is_a_programming_error() -> None:
    gif = next(fmt for fmt in FORMATS if fmt.name == "GIF")
    with pytest.raises(ValueError):
        encode_image(gradient(), gif, quality=90)


def test_the_format_table_names_each_format_once() -> None:
    for column in ("name", "pil", "extension", "media_type"):
        values = [getattr(fmt, column) for fmt in FORMATS]
        assert len(values) == len(set(values)), column
    assert set(STORED_BY_EXTENSION) == {"jpg", "png", "webp"}
    # Each output format writes what Pillow reads back as that format.
    for fmt in STORED_BY_EXTENSION.values():
        assert decode(encode_image(gradient(), fmt, quality=90)).format == fmt.pil


def test_output_formats_are_read_in_any_case_and_jpeg_is_jpg() -> None:
    assert output_format("png") is PNG
    assert output_format("jpeg") is output_format("JPG") is JPG
    assert output_format("GIF") is None and output_format("bmp") is None


def test_base64() -> None:
    data = encode_image(gradient(), PNG, quality=90)
    assert base64.b64decode(to_base64(data)) == data
