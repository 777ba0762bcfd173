"""The colour vocabulary of the demo world.

The demo booru draws its characters only in these flat colours, and the built-in tiny
vision models recognise tags by these colours. That is what lets a synthetic image go
through the whole chain with meaningful results while every model stays a real ONNX
graph with the real model's inputs and outputs. Every colour is at least
`MIN_COLOUR_DISTANCE` (RGB euclidean) away from every other one and from the
backgrounds, so JPEG re-encoding and resizing never turn one tag into another.
"""

from __future__ import annotations

MIN_COLOUR_DISTANCE = 60.0

# tag -> RGB. Hair, eyes and body features are the character's "core" tags; garments
# are outfit tags.
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "red_hair": (205, 35, 35),
    "black_hair": (55, 35, 35),
    "silver_hair": (170, 175, 200),
    "green_hair": (40, 150, 60),
    "pink_hair": (245, 110, 185),
    "blonde_hair": (240, 205, 70),
}
EYE_COLOURS: dict[str, tuple[int, int, int]] = {
    "yellow_eyes": (255, 240, 0),
    "brown_eyes": (125, 70, 20),
    "blue_eyes": (0, 120, 255),
    "purple_eyes": (150, 50, 230),
    "red_eyes": (255, 0, 110),
}
FEATURE_COLOURS: dict[str, tuple[int, int, int]] = {
    "horns": (90, 60, 90),
    "hair_ribbon": (0, 220, 220),
}
GARMENT_COLOURS: dict[str, tuple[int, int, int]] = {
    "orange_shirt": (255, 140, 0),
    "navy_jacket": (20, 40, 110),
    "beige_skirt": (200, 170, 120),
    "green_dress": (120, 200, 20),
    "purple_skirt": (90, 0, 120),
    "brown_coat": (160, 100, 70),
    "blue_shirt": (80, 170, 240),
    "black_pants": (0, 0, 0),
}
SKIN = (255, 222, 196)
WHITE = (255, 255, 255)
# Plain backgrounds the booru uses besides white.
BACKGROUNDS = {
    "white_background": WHITE,
    "blue_background": (215, 235, 250),
}

TAG_COLOURS: dict[str, tuple[int, int, int]] = {
    **HAIR_COLOURS,
    **EYE_COLOURS,
    **FEATURE_COLOURS,
    **GARMENT_COLOURS,
}


def colour_distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) ** 0.5
