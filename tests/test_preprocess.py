"""The one preprocessing path: real files in every mode the worker meets, and the ones it must refuse."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from worker.exceptions import ImageRejected
from worker.preprocess import decode, draft_scale, load_pixels

LIMIT = 64_000_000


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: the shape of a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_supported_formats_become_uint8_rgb_of_the_model_size(fmt):
    data = encode(Image.new("RGB", (400, 533), (200, 10, 10)), fmt)
    pixels = load_pixels(data, (32, 24), max_pixels=LIMIT)
    assert pixels.shape == (32, 24, 3) and pixels.dtype == np.uint8
    assert pixels[..., 0].mean() > 150 and pixels[..., 1].mean() < 60


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # the left third red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: the left edge becomes the top
    upright = np.asarray(decode(encode(image, "JPEG", exif=exif), max_pixels=LIMIT)).astype(int)
    assert upright.shape == (60, 20, 3)
    top, bottom = upright[:16].mean((0, 1)), upright[-36:].mean((0, 1))
    assert top[0] > 200 and top[2] < 50  # red on top
    assert bottom[2] > 200 and bottom[0] < 50  # blue below


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [("CMYK", (0, 255, 255, 0), (255, 0, 0)),  # no cyan, full magenta and yellow: red
     ("L", 128, (128, 128, 128)), ("LA", (128, 255), (128, 128, 128)),
     ("I;16", 40000, (255, 255, 255)),  # 16-bit is scaled to its own maximum
     ("1", 1, (255, 255, 255)),
     ("P", 3, Image.new("P", (1, 1), 3).convert("RGB").getpixel((0, 0)))],  # the palette's colour 3
)
def test_every_mode_is_flattened_to_rgb(mode, color, expected):
    image = Image.new(mode, (16, 16), color)
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    rgb = decode(encode(image, fmt), max_pixels=LIMIT)
    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    pixels = np.asarray(rgb).reshape(-1, 3).astype(int)
    assert np.abs(pixels - np.array(expected)).max() <= 3  # JPEG may move a flat colour by a step or two


def test_sixteen_bit_keeps_its_contrast():
    array = np.zeros((8, 8), dtype=np.uint16)
    array[:, 4:] = 65535
    rgb = np.asarray(decode(encode(Image.fromarray(array), "PNG"), max_pixels=LIMIT))
    assert rgb[:, :4].max() == 0 and rgb[:, 4:].min() == 255


def test_transparency_becomes_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgb = np.asarray(decode(encode(image, "PNG"), max_pixels=LIMIT))
    assert (rgb == 255).all()


def test_large_jpeg_is_decoded_at_reduced_scale_with_the_same_result_shape():
    data = encode(Image.new("RGB", (4000, 3000), (10, 200, 10)), "JPEG")
    drafted = decode(data, max_pixels=LIMIT, draft_size=(260, 260))
    assert drafted.size == (500, 375)  # 1/8 scale, still larger than the model input
    assert load_pixels(data, (260, 260), max_pixels=LIMIT).shape == (260, 260, 3)


@pytest.mark.parametrize(
    ("image_size", "scale", "decoded"),
    [
        ((400, 533), 2, (200, 267)),  # a listing photo: each side keeps >= 3/4 of 260 (195)
        ((389, 533), 1, (389, 533)),  # 1/2 would leave 194 < 195
        ((1040, 780), 4, (260, 195)),
        ((4000, 3000), 8, (500, 375)),  # 1/8 is the most libjpeg offers
        ((260, 260), 1, (260, 260)),
        ((120, 90), 1, (120, 90)),  # smaller than the input
    ],
)
def test_jpeg_is_decoded_at_the_smallest_scale_that_keeps_three_quarters_of_the_input(image_size, scale, decoded):
    assert draft_scale(image_size, (260, 260)) == scale
    data = encode(Image.new("RGB", image_size, (10, 200, 10)), "JPEG")
    assert decode(data, max_pixels=LIMIT, draft_size=(260, 260)).size == decoded
    png = encode(Image.new("RGB", image_size, (10, 200, 10)), "PNG")
    assert decode(png, max_pixels=LIMIT, draft_size=(260, 260)).size == image_size  # only JPEG has a DCT


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"<html><body>hello</body></html>", "not a supported image"),
        (b"\x7fELF\x02\x01\x01" + b"\0" * 100, "not a supported image"),
        (png_header(50_000, 50_000), "exceeds the limit"),
    ],
)
def test_bad_bytes_are_rejected_with_a_clear_reason(data, message):
    with pytest.raises(ImageRejected, match=message):
        load_pixels(data, (32, 32), max_pixels=LIMIT)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_files_are_rejected(fmt):
    data = encode(Image.effect_noise((256, 256), 60).convert("RGB"), fmt)
    with pytest.raises(ImageRejected):
        load_pixels(data[: len(data) // 2], (32, 32), max_pixels=LIMIT)


def test_animated_images_are_rejected():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageRejected, match="animated WEBP with 2 frames"):
        load_pixels(buffer.getvalue(), (32, 32), max_pixels=LIMIT)


def test_gif_is_not_accepted_even_though_pillow_reads_it():
    with pytest.raises(ImageRejected, match="expected one of JPEG, PNG, WEBP"):
        load_pixels(encode(Image.new("RGB", (8, 8)), "GIF"), (32, 32), max_pixels=LIMIT)
