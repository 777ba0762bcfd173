"""Image conversions every vision wrapper shares."""

from __future__ import annotations

from PIL import Image


def rgb_on_white(image: Image.Image) -> Image.Image:
    """RGB copy of `image` with any transparency composited on white.

    Transparent pixels often hide black (or garbage) colour values; converting straight
    to RGB would show them, so alpha never reaches a model.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
