"""Turn downloaded bytes into a clean RGB picture, or quarantine them with a reason.

Booru files are hostile input: empty bodies, HTML error pages served as `.jpg`,
truncated downloads, decompression bombs, CMYK JPEGs, 16-bit PNGs, palette images with
a transparent colour, rotated phone photos, animated GIFs. Every later step may assume
what `decode_image` returns: an 8-bit RGB image, upright, at most `max_area` pixels,
with any transparency composited on white (alpha never reaches training: a model
trained on black "transparent" pixels learns black halos).

Order matters for memory: the pixel count is read from the header and refused *before*
any pixel is decoded, and large JPEGs are decoded at a reduced scale (`draft`) when
they will be downscaled anyway.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A hard ceiling on the header's pixel count: 40 MP covers the largest honest booru
# uploads (e.g. 8000x5000) while a bomb (a few KB declaring 50000x50000) is refused
# before its pixels are allocated.
DEFAULT_MAX_PIXELS = 40_000_000
# Huge images are scaled down to this area right after decoding. 2048x2048 is four
# times the largest SD1.5 training bucket (1024x1024 area at 512 resolution is 512x512;
# at 1024 resolution it is 1024x1024), which leaves head crops of a full-body picture
# enough pixels while keeping a decoded picture under 13 MB in memory.
DEFAULT_MAX_AREA = 2048 * 2048

WHITE = (255, 255, 255)
_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")


@dataclass(frozen=True)
class DecodedImage:
    """A picture ready for the models: RGB, upright, capped in area, alpha on white."""

    image: Image.Image
    source_format: str  # the container PIL recognised: "JPEG", "PNG", "GIF", "WEBP"...
    source_size: tuple[int, int]  # width, height in the file, before rotation and capping
    notes: tuple[str, ...]  # what had to be fixed: "exif_rotated", "alpha_on_white", ...

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


@dataclass(frozen=True)
class Quarantined:
    """Bytes that are not a usable picture. `reason` is a short stable code to count by."""

    reason: str  # empty | not_an_image | html | too_many_pixels | truncated | corrupt
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_area: int = DEFAULT_MAX_AREA,
) -> DecodedImage | Quarantined:
    """Decode `data` into an RGB picture of at most `max_area` pixels, or say why not.

    `max_pixels` refuses files whose header declares more pixels than that (checked
    before decoding); `max_area` is the size bigger pictures are scaled down to.
    """
    if max_area > max_pixels:
        raise ValueError(f"max_area ({max_area}) must not exceed max_pixels ({max_pixels})")
    if not data:
        return Quarantined("empty", "the file has zero bytes")
    head = data[:512].lstrip().lower()
    if any(head.startswith(marker) for marker in _HTML_MARKERS):
        return Quarantined("html", "the server sent an HTML/XML page instead of an image")

    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # We enforce our own, stricter ceiling below; PIL's warning would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            source_format = image.format or "unknown"
            width, height = image.size
            if width <= 0 or height <= 0:
                return Quarantined("corrupt", f"the header declares a {width}x{height} picture")
            if width * height > max_pixels:
                return Quarantined(
                    "too_many_pixels",
                    f"{width}x{height} = {width * height} pixels exceeds the {max_pixels} limit",
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animations: the first frame stands for the post
                notes.append("animated_first_frame")
            if source_format == "JPEG" and width * height > 4 * max_area:
                # Decode at 1/2, 1/4 or 1/8 scale when the picture shrinks anyway.
                image.draft(None, _capped_size(width, height, max_area))
            image.load()
    except UnidentifiedImageError:
        return Quarantined("not_an_image", "no image format recognises these bytes")
    except Image.DecompressionBombError as error:
        return Quarantined("too_many_pixels", str(error))
    except OSError as error:
        message = str(error)
        if "truncated" in message.lower():
            return Quarantined("truncated", message)
        return Quarantined("corrupt", message)
    except (SyntaxError, ValueError, EOFError, IndexError) as error:
        # PIL's plugins raise these for malformed headers and chunks.
        return Quarantined("corrupt", f"{type(error).__name__}: {error}")

    try:
        rgb = _to_rgb_on_white(_upright(image, notes), notes)
    except (OSError, ValueError) as error:
        return Quarantined("corrupt", f"cannot convert {image.mode} to RGB: {error}")

    if rgb.width * rgb.height > max_area:
        rgb = rgb.resize(_capped_size(rgb.width, rgb.height, max_area), Image.Resampling.LANCZOS)
        notes.append("downscaled")
    return DecodedImage(rgb, source_format, (width, height), tuple(notes))


def _capped_size(width: int, height: int, max_area: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio and an area of at most `max_area`."""
    scale = math.sqrt(max_area / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _upright(image: Image.Image, notes: list[str]) -> Image.Image:
    orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
    if orientation in (None, 1):
        return image
    notes.append("exif_rotated")
    return ImageOps.exif_transpose(image)


def _to_rgb_on_white(image: Image.Image, notes: list[str]) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, compositing transparency over white."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        notes.append("high_bit_depth")
        image = _to_8bit_grey(image)
        mode = image.mode
    if mode == "P" or mode == "PA":
        has_alpha = "transparency" in image.info or mode == "PA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    if mode == "CMYK":
        notes.append("cmyk")
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # some pixel is not fully opaque
            notes.append("alpha_on_white")
            background = Image.new("RGBA", rgba.size, WHITE + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return rgba.convert("RGB")
    if mode == "L" and "transparency" in image.info:  # grey PNG with a transparent value
        notes.append("alpha_on_white")
        return _to_rgb_on_white(image.convert("LA"), [])
    if mode == "RGB" and "transparency" in image.info:  # RGB PNG with a transparent colour
        notes.append("alpha_on_white")
        return _to_rgb_on_white(image.convert("RGBA"), [])
    return image if mode == "RGB" else image.convert("RGB")


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """16/32-bit greyscale -> 8-bit 'L', keeping the full range (PIL would clip at 255)."""
    pixels = np.asarray(image, dtype=np.float64)
    low, high = (0.0, 65535.0) if pixels.max() > 255 else (0.0, 255.0)
    if image.mode == "F" and pixels.max() <= 1.0:
        high = 1.0
    scaled = np.clip((pixels - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # uint8 2-D -> "L"
