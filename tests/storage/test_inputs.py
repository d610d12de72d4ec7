from __future__ import annotations

import asyncio
import base64
import io
import struct
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from imagewire.storage.errors import StorageError
from imagewire.storage.fetch import UrlFetcher
from imagewire.storage.formats import INFERENCE_INPUTS, UPLOAD_INPUTS
from imagewire.storage.inputs import InputImage, prepare_upload, resolve_image_input
from imagewire.storage.store import ImageStore
from imagewire.tasks.errors import ImageNotFound, InvalidParameter, TaskError
from imagewire.tasks.inputs import task_error

OWNER = "owner-a"
MAX_BYTES = 4 * 1024 * 1024
MAX_PIXELS = 4096 * 4096


def encoded(size: tuple[int, int] = (64, 48), format: str = "PNG", mode: str = "RGB", **options: object) -> bytes:
    image = Image.new(mode, size, (200, 30, 60, 255)[: len(mode)] if mode != "P" else 3)
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width``×``height`` but carries only a few bytes of pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


async def resolve(
    value: str,
    store: ImageStore,
    *,
    parameter: str = "seedImage",
    fetcher: UrlFetcher | None = None,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    allowed_formats: frozenset[str] = INFERENCE_INPUTS,
) -> InputImage:
    """Resolve an input image; a failure is reported as the task layer reports it for ``parameter``."""
    try:
        return await resolve_image_input(
            value,
            owner=OWNER,
            store=store,
            fetcher=fetcher or UrlFetcher(),
            max_pixels=max_pixels,
            max_bytes=max_bytes,
            allowed_formats=allowed_formats,
        )
    except StorageError as exc:
        raise task_error(exc, parameter) from exc


async def refused(value: str, store: ImageStore, **options: object) -> TaskError:
    parameter = str(options.pop("parameter", "seedImage"))
    with pytest.raises(TaskError) as caught:
        await resolve(value, store, parameter=parameter, **options)  # type: ignore[arg-type]
    assert caught.value.parameter == parameter
    return caught.value


@asynccontextmanager
async def serving(body: bytes) -> AsyncIterator[str]:
    """An HTTP server on 127.0.0.1 that answers every request with ``body``; yields its URL."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/input.png"
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


# ---------------------------------------------------------------- the four forms


async def test_image_uuid_of_a_stored_image(store: ImageStore) -> None:
    data = encoded((64, 48))
    stored = await store.put(data, extension="png", owner=OWNER)
    for text in (stored.uuid, stored.uuid.upper(), f" {stored.uuid}\n"):
        image = await resolve(text, store)
        assert (image.format, image.width, image.height, image.image.mode) == ("PNG", 64, 48, "RGB")
        assert image.data == data


async def test_image_uuid_of_another_owner_is_not_found(store: ImageStore) -> None:
    stored = await store.put(encoded(), extension="png", owner="owner-b")
    error = await refused(stored.uuid, store, parameter="image")
    assert isinstance(error, ImageNotFound)
    assert error.code == "imageNotFound"


async def test_data_uri(store: ImageStore) -> None:
    data = encoded((30, 20), "JPEG")
    image = await resolve("data:image/jpeg;base64," + base64.b64encode(data).decode(), store)
    assert (image.format, image.width, image.height) == ("JPEG", 30, 20)
    assert image.data == data


async def test_raw_base64_with_line_breaks_and_no_padding(store: ImageStore) -> None:
    data = encoded((33, 17), "WEBP")
    text = base64.b64encode(data).decode().rstrip("=")
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    image = await resolve(wrapped, store)
    assert (image.format, image.width, image.height) == ("WEBP", 33, 17)


async def test_http_url(store: ImageStore) -> None:
    data = encoded((40, 40))
    async with serving(data) as url:
        image = await resolve(url, store, fetcher=UrlFetcher(allow_private=True))
    assert (image.format, image.width, image.height) == ("PNG", 40, 40)
    assert image.data == data


async def test_http_url_to_loopback_is_refused_by_default(store: ImageStore) -> None:
    async with serving(encoded()) as url:
        error = await refused(url, store, fetcher=UrlFetcher())
    assert error.code == "invalidParameter"
    assert "non-public" in error.message


@pytest.mark.parametrize("value", ["ftp://example.com/a.png", "file:///etc/passwd", "s3://bucket/key"])
async def test_other_url_schemes_are_refused(store: ImageStore, value: str) -> None:
    error = await refused(value, store)
    assert isinstance(error, InvalidParameter)
    assert repr(value.split("://")[0]) in error.message


@pytest.mark.parametrize(
    "value",
    [
        "data:text/plain;base64,aGVsbG8=",
        "data:image/png,rawbytes",
        "data:image/png;base64",
        "data:;base64,aGVsbG8=",
    ],
)
async def test_malformed_data_uris_are_refused(store: ImageStore, value: str) -> None:
    error = await refused(value, store)
    assert isinstance(error, InvalidParameter)
    assert "data:image/<format>;base64,<data>" in error.message


async def test_data_uri_with_invalid_base64(store: ImageStore) -> None:
    error = await refused("data:image/png;base64,***", store, parameter="image")
    assert "not hold valid base64" in error.message


@pytest.mark.parametrize("value", ["hello world!", "not/a/uuid/../x", "12345678-1234-4234-8234-123456789abz"])
async def test_text_that_is_no_form_at_all(store: ImageStore, value: str) -> None:
    error = await refused(value, store)
    assert isinstance(error, InvalidParameter)
    assert "seedImage is not an image UUID, a data URI, base64 data or an http(s) URL" in error.message


async def test_empty_value(store: ImageStore) -> None:
    error = await refused("  ", store)
    assert isinstance(error, InvalidParameter)


async def test_base64_over_the_size_limit(store: ImageStore) -> None:
    text = base64.b64encode(b"\x00" * 3000).decode()
    error = await refused(text, store, max_bytes=1000)
    assert isinstance(error, InvalidParameter)
    assert "more than the 1000 bytes allowed" in error.message


async def test_fetched_body_over_the_size_limit(store: ImageStore) -> None:
    async with serving(encoded((64, 64)) + b"\x00" * 2000) as url:
        error = await refused(url, store, fetcher=UrlFetcher(allow_private=True), max_bytes=1000)
    assert "more than the 1000 bytes allowed" in error.message


# ---------------------------------------------------------------- decoding


async def test_bytes_that_are_not_an_image(store: ImageStore) -> None:
    error = await refused(base64.b64encode(b"this is plain text, not pixels").decode(), store)
    assert isinstance(error, InvalidParameter)
    assert "not an image in an accepted format (JPEG, PNG, WEBP)" in error.message
    assert "BytesIO" not in error.message


async def test_truncated_png(store: ImageStore) -> None:
    image = Image.effect_noise((256, 256), 64).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    error = await refused(base64.b64encode(data[: len(data) // 2]).decode(), store)
    assert isinstance(error, InvalidParameter)
    assert error.message.startswith("seedImage could not be decoded: ")


async def test_bmp_is_refused_for_inference(store: ImageStore) -> None:
    error = await refused(base64.b64encode(encoded(format="BMP")).decode(), store)
    assert isinstance(error, InvalidParameter)
    assert "JPEG, PNG, WEBP" in error.message
    assert "received a BMP image" in error.message
    assert error.allowed_values == ["JPEG", "PNG", "WEBP"]


@pytest.mark.parametrize("format", ["BMP", "GIF"])
async def test_bmp_and_gif_are_accepted_for_upload(store: ImageStore, format: str) -> None:
    image = await resolve(base64.b64encode(encoded((20, 10), format)).decode(), store, allowed_formats=UPLOAD_INPUTS)
    assert (image.format, image.width, image.height, image.image.mode) == (format, 20, 10, "RGB")


async def test_pixel_limit_is_checked_from_the_header(store: ImageStore) -> None:
    # 25 million pixels declared, a few bytes present: had the image been decoded first,
    # this would fail as truncated rather than as too large.
    error = await refused(base64.b64encode(png_header_only(5000, 5000)).decode(), store, max_pixels=1_000_000)
    assert isinstance(error, InvalidParameter)
    assert "at most 1000000 pixels" in error.message
    assert "5000×5000" in error.message


async def test_decompression_bomb_is_refused_without_decoding(store: ImageStore) -> None:
    started = time.monotonic()
    error = await refused(base64.b64encode(png_header_only(20000, 20000)).decode(), store, parameter="image")
    assert time.monotonic() - started < 1
    assert isinstance(error, InvalidParameter)
    assert f"at most {MAX_PIXELS} pixels" in error.message


async def test_alpha_is_flattened_on_white(store: ImageStore) -> None:
    transparent = encoded((8, 8), "PNG", mode="RGBA")
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    buffer = io.BytesIO()
    clear.save(buffer, format="PNG")
    image = await resolve(base64.b64encode(buffer.getvalue()).decode(), store)
    assert image.image.mode == "RGB"
    assert image.image.getpixel((4, 4)) == (255, 255, 255)
    assert (await resolve(base64.b64encode(transparent).decode(), store)).image.getpixel((0, 0)) == (200, 30, 60)


async def test_exif_orientation_is_applied(store: ImageStore) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encoded((40, 20), "JPEG", exif=exif.tobytes())
    image = await resolve(base64.b64encode(data).decode(), store)
    assert (image.width, image.height) == (20, 40)
    assert image.image.size == (20, 40)


async def test_multi_picture_jpeg_counts_as_jpeg(store: ImageStore) -> None:
    frames = [Image.new("RGB", (24, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    image = await resolve(base64.b64encode(buffer.getvalue()).decode(), store)
    assert (image.format, image.width, image.height) == ("JPEG", 24, 16)
    stored, extension = await prepare_upload(image)
    # Stored as its first picture, byte for byte up to its end: the others and their index go.
    assert extension == "jpg" and buffer.getvalue().startswith(stored[:2])
    with Image.open(io.BytesIO(stored)) as kept:
        assert kept.format == "JPEG" and kept.size == (24, 16) and getattr(kept, "n_frames", 1) == 1
        assert ImageChops.difference(kept.convert("RGB"), Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
                                     ).getbbox() is None


async def test_first_frame_of_an_animated_gif(store: ImageStore) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = await resolve(base64.b64encode(buffer.getvalue()).decode(), store, allowed_formats=UPLOAD_INPUTS)
    red, green, blue = image.image.getpixel((8, 8))  # type: ignore[misc]
    assert red > 200 and blue < 50


# ---------------------------------------------------------------- uploads


async def test_prepare_upload_downsizes_keeping_aspect(store: ImageStore) -> None:
    image = await resolve(
        base64.b64encode(encoded((3000, 1000), "JPEG")).decode(), store, allowed_formats=UPLOAD_INPUTS
    )
    data, extension = await prepare_upload(image)
    assert extension == "png"
    stored = Image.open(io.BytesIO(data))
    assert stored.format == "PNG"
    assert stored.width == 2048
    assert abs(stored.height - 683) <= 1


async def test_prepare_upload_keeps_small_images_byte_for_byte(store: ImageStore) -> None:
    for format, extension in (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")):
        data = encoded((300, 200), format)
        image = await resolve(base64.b64encode(data).decode(), store, allowed_formats=UPLOAD_INPUTS)
        assert await prepare_upload(image) == (data, extension)


async def test_prepare_upload_reencodes_bmp_as_png(store: ImageStore) -> None:
    image = await resolve(base64.b64encode(encoded((30, 20), "BMP")).decode(), store, allowed_formats=UPLOAD_INPUTS)
    data, extension = await prepare_upload(image)
    assert extension == "png"
    stored = Image.open(io.BytesIO(data))
    assert (stored.format, stored.size) == ("PNG", (30, 20))
