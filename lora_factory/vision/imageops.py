"""Image conversions every vision wrapper shares."""

from __future__ import annotations

from PIL import Image


def rgb_on_white(image: Image.Image) -> Image.Image:
    """RGB copy of `image` with any transparency composited on white.

    Transparent pixels often hide black (or garbage) colour values; converting straight
    to RGB would show them, so alpha never reaches a model. For RGBA and LA pictures
    this gives exactly the pixels of imgutils' `load_image(..., mode="RGB")` (a paste on
    white through the alpha mask: the same rounding, checked for every colour and alpha
    value) and of SmilingWolf's tagger code (an alpha composite on white). A transparent
    palette or colour key ("transparency" in the image info) also goes on white, where
    imgutils shows the hidden colour of a palette picture.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
