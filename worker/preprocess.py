"""Decode image bytes and resize them the way the model expects.

This is the one preprocessing path of the project: the worker classifies with it, and training measures
validation accuracy through it, so the accuracy we report is the accuracy the worker delivers.

The model's ONNX graph takes uint8 RGB pixels (NHWC) and normalises them itself, so all that happens here
is: check the header, decode (a JPEG at 1/2, 1/4 or 1/8 scale when that still leaves enough pixels, see
`DRAFT_MIN_SHARE`), apply the EXIF orientation, flatten any mode (CMYK, 16-bit, palette, alpha…) to
8-bit RGB, and resize.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from worker.exceptions import ImageRejected

#: Formats the worker accepts. Others are rejected with a clear message even when Pillow could read them.
FORMATS = ("JPEG", "PNG", "WEBP")

#: Resize policies a model may ask for in its `resize` metadata.
RESIZE_POLICIES = ("squash",)

#: A JPEG is decoded at 1/2, 1/4 or 1/8 scale straight from the DCT (Pillow's `draft`) as long as each side
#: keeps at least this share of the model's input side; the resize then scales up a little at most. For a
#: 400x533 listing photo and a 260x260 model that is 1/2 scale: decode and resize 2.2 -> 1.2 ms, the
#: largest cost of a photo besides the model. Validation accuracy: int8 0.9267 -> 0.9296, fp32
#: 0.9267 -> 0.9238 (one photo of 341 either way; 2 % of the predictions change, in both directions).
DRAFT_MIN_SHARE = 0.75

# Pillow enforces its own decompression-bomb limit process-wide; we check dimensions ourselves against the
# configured limit before decoding, so Pillow's global one is switched off to give one clear message.
Image.MAX_IMAGE_PIXELS = None


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Parse the header of `data` and check it is one still image we accept; nothing is decoded yet."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageRejected(f"not a supported image (expected one of {', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"unreadable image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageRejected(
            f"image too large: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"
        )
    if getattr(image, "n_frames", 1) > 1:
        raise ImageRejected(f"animated {image.format} with {image.n_frames} frames is not supported")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any Pillow mode to 8-bit RGB; transparent areas become white, as on a listing page."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max()
        scale = 255.0 / top if top > 255 else 1.0
        gray = np.clip(array * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode == "P":
        return image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def draft_scale(image_size: tuple[int, int], size: tuple[int, int], min_share: float = DRAFT_MIN_SHARE) -> int:
    """The reduction (1, 2, 4 or 8) a JPEG of `image_size` (width, height) is decoded at for a model
    input of `size` (height, width): the largest that leaves each side at least `min_share` of the
    model's longer input side. The same rule as Pillow's `draft`, which `decode` asks for it."""
    least = max(1, round(max(size) * min_share))
    fits = min(image_size[0] // least, image_size[1] // least)
    return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def decode(data: bytes, *, max_pixels: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode `data` to an upright 8-bit RGB image.

    `draft_size` (height, width of the model input) lets the JPEG decoder skip detail the resize would
    mostly throw away: it decodes at the scale `draft_scale` picks. Raises `ImageRejected` for anything
    that is not a complete, sane, still JPEG/PNG/WebP.
    """
    image = open_image(data, max_pixels=max_pixels)
    try:
        if draft_size is not None and image.format == "JPEG":
            scale = draft_scale(image.size, draft_size)
            if scale > 1:
                image.draft("RGB", (image.width // scale, image.height // scale))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to rotate
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageRejected(f"corrupt or truncated {image.format}: {exc}") from None
    except MemoryError:
        raise ImageRejected("image needs more memory to decode than is available") from None
    return to_rgb(image)


def resize(image: Image.Image, size: tuple[int, int], policy: str = "squash") -> np.ndarray:
    """Resize to `size` = (height, width) by `policy` and return a uint8 array of shape (H, W, 3)."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}; supported: {', '.join(RESIZE_POLICIES)}")
    height, width = size
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def load_pixels(
    data: bytes, size: tuple[int, int], *, max_pixels: int, policy: str = "squash"
) -> np.ndarray:
    """Bytes of an image file → uint8 (H, W, 3) RGB array ready for the model. The whole worker path."""
    image = decode(data, max_pixels=max_pixels, draft_size=size)
    return resize(image, size, policy)
