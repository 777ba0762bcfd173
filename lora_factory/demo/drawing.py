"""Draws the demo world's characters: simple standing figures in flat palette colours.

Every shape is drawn without antialiasing and only in `palette` colours (+ SKIN and the
plain backgrounds), so a freshly drawn image holds nothing but tag colours, and the
built-in tiny vision models can read hair, eyes, features and garments from it.
Proportions are fixed (the head is a fifth of the figure's height, the figure 0.36 times
as wide as it is tall) so detectors built for this world know what a person, a half
body and a head look like. Everything random comes from the caller's `random.Random`,
so a seed gives the same pictures every time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from lora_factory.demo.characters import DemoCharacter
from lora_factory.demo.palette import (
    BACKGROUNDS,
    EYE_COLOURS,
    FEATURE_COLOURS,
    GARMENT_COLOURS,
    HAIR_COLOURS,
    SKIN,
)

# A figure is laid out on a 100-unit tall grid whose x origin is the figure's centre;
# the widest parts (the hands) reach 18 units either side.
FIGURE_UNITS = 100.0
HALF_WIDTH_UNITS = 18.0
FIGURE_WIDTH_RATIO = 2 * HALF_WIDTH_UNITS / FIGURE_UNITS
HEAD_TOP, HEAD_BOTTOM, HEAD_HALF_WIDTH = 4.0, 24.0, 9.0  # the face ellipse: 1/5 of the height
# The upper body (head to hips) is what a half-body crop of this figure holds.
HALF_BODY_BOTTOM = 58.0

Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive)


@dataclass(frozen=True)
class FigurePlacement:
    """Where a figure goes: its box's top-left corner and its height in pixels."""

    left: int
    top: int
    height: int

    @property
    def width(self) -> int:
        return round(self.height * FIGURE_WIDTH_RATIO)


@dataclass(frozen=True)
class DrawnFigure:
    """One figure in a picture and the boxes a detector should find for it."""

    character_key: str
    outfit: tuple[str, ...]
    box: Box
    half_body_box: Box
    head_box: Box

    def scaled(self, factor_x: float, factor_y: float) -> DrawnFigure:
        """The same figure in a copy of the picture resized by these factors."""

        def scale(box: Box) -> Box:
            left, top, right, bottom = box
            return (
                round(left * factor_x),
                round(top * factor_y),
                round(right * factor_x),
                round(bottom * factor_y),
            )

        return DrawnFigure(
            self.character_key,
            self.outfit,
            scale(self.box),
            scale(self.half_body_box),
            scale(self.head_box),
        )


@dataclass(frozen=True)
class DrawnPost:
    image: Image.Image  # RGB
    figures: tuple[DrawnFigure, ...]  # left to right


class _FigureCanvas:
    """Turns figure units into pixels for one placement, so shapes read like the layout."""

    def __init__(self, draw: ImageDraw.ImageDraw, placement: FigurePlacement) -> None:
        self.draw = draw
        self.unit = placement.height / FIGURE_UNITS
        self.centre_x = placement.left + placement.width / 2
        self.top = placement.top

    def point(self, x: float, y: float) -> tuple[int, int]:
        return round(self.centre_x + x * self.unit), round(self.top + y * self.unit)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> Box:
        """The pixel box between two corners given in any order (mirrored shapes flip x)."""
        (left, top), (right, bottom) = self.point(x0, y0), self.point(x1, y1)
        return min(left, right), min(top, bottom), max(left, right), max(top, bottom)

    def polygon(self, points: Sequence[tuple[float, float]], colour: tuple[int, int, int]) -> None:
        self.draw.polygon([self.point(x, y) for x, y in points], fill=colour)

    def mirrored_polygon(
        self, points: Sequence[tuple[float, float]], colour: tuple[int, int, int]
    ) -> None:
        """Draw a left-side shape and its mirror image on the right side."""
        self.polygon(points, colour)
        self.polygon([(-x, y) for x, y in points], colour)

    def ellipse(self, x0: float, y0: float, x1: float, y1: float, colour) -> None:
        self.draw.ellipse(self.box(x0, y0, x1, y1), fill=colour)

    def rectangle(self, x0: float, y0: float, x1: float, y1: float, colour) -> None:
        self.draw.rectangle(self.box(x0, y0, x1, y1), fill=colour)


def _check_outfit(outfit: tuple[str, ...]) -> None:
    unknown = [garment for garment in outfit if garment not in GARMENT_COLOURS]
    if unknown or len(outfit) not in (1, 2):
        raise ValueError(
            f"outfit {outfit!r} must be (top, bottom) or (dress,) made of palette garments; "
            f"unknown garments: {unknown}"
        )


def _is_trousers(garment: str) -> bool:
    return garment.endswith("pants")


def draw_figure(
    draw: ImageDraw.ImageDraw,
    character: DemoCharacter,
    outfit: tuple[str, ...],
    placement: FigurePlacement,
) -> DrawnFigure:
    """Draw one standing figure of `character` wearing `outfit` at `placement`."""
    _check_outfit(outfit)
    canvas = _FigureCanvas(draw, placement)
    hair = HAIR_COLOURS[character.hair]
    eyes = EYE_COLOURS[character.eyes]
    top_colour = GARMENT_COLOURS[outfit[0]]
    long_hair = character.hair_length == "long"

    # Back to front: hair behind the body, legs, lower garment, torso, arms, head.
    if long_hair:
        canvas.ellipse(-11.5, 2.5, 11.5, 26, hair)
        canvas.polygon([(-11.5, 14), (11.5, 14), (16, 52), (-16, 52)], hair)
    for side in (-1, 1):
        canvas.rectangle(side * 2.5, 60, side * 7, 96, SKIN)
        canvas.ellipse(side * 1.5, 94.5, side * 8, 99, SKIN)
    if len(outfit) == 1:  # a dress from the shoulders to the knees
        canvas.polygon([(-10, 26), (10, 26), (10, 45), (15, 74), (-15, 74), (-10, 45)], top_colour)
    else:
        bottom_colour = GARMENT_COLOURS[outfit[1]]
        if _is_trousers(outfit[1]):
            canvas.rectangle(-10, 53, 10, 62, bottom_colour)
            canvas.mirrored_polygon([(-10, 53), (-0.5, 53), (-1, 95), (-9, 95)], bottom_colour)
        else:
            canvas.polygon([(-10, 53), (10, 53), (14, 72), (-14, 72)], bottom_colour)
        canvas.polygon([(-11, 26), (11, 26), (10, 55), (-10, 55)], top_colour)
    canvas.mirrored_polygon([(-10.5, 28), (-14, 27), (-18, 57), (-14.5, 58)], SKIN)
    canvas.mirrored_polygon([(-10.5, 28), (-14, 27), (-15.8, 40.5), (-12.3, 41)], top_colour)
    canvas.rectangle(-2.5, 21, 2.5, 27, SKIN)
    if not long_hair:
        canvas.ellipse(-11, 2.5, 11, 22, hair)
    canvas.ellipse(-HEAD_HALF_WIDTH, HEAD_TOP, HEAD_HALF_WIDTH, HEAD_BOTTOM, SKIN)
    # Bangs: the upper half of an ellipse a little larger than the face.
    draw.chord(canvas.box(-10, 2.5, 10, 26), 180, 360, fill=hair)
    if long_hair:  # locks falling in front of the shoulders
        canvas.mirrored_polygon([(-10, 13), (-7, 13), (-8, 44), (-11.5, 44)], hair)
    else:  # sideburns
        canvas.mirrored_polygon([(-10, 13), (-7.5, 13), (-8, 20), (-9.5, 20)], hair)
    for side in (-1, 1):  # each eye is 20% of the face wide: it survives downscaling
        canvas.ellipse(side * 2.2, 15, side * 5.8, 20, eyes)
    if "horns" in character.features:
        canvas.mirrored_polygon([(-7.5, 8), (-3.5, 6), (-8.5, 0)], FEATURE_COLOURS["horns"])
    if "hair_ribbon" in character.features:
        ribbon = FEATURE_COLOURS["hair_ribbon"]
        canvas.polygon([(6, 4.5), (2, 1), (2, 8)], ribbon)
        canvas.polygon([(6, 4.5), (10, 1), (10, 8)], ribbon)
        canvas.rectangle(5, 3.5, 7, 5.5, ribbon)

    head_top = 0.0 if "horns" in character.features else 1.0
    return DrawnFigure(
        character_key=character.key,
        outfit=outfit,
        box=canvas.box(-HALF_WIDTH_UNITS, 0, HALF_WIDTH_UNITS, FIGURE_UNITS),
        half_body_box=canvas.box(-HALF_WIDTH_UNITS, 0, HALF_WIDTH_UNITS, HALF_BODY_BOTTOM),
        head_box=canvas.box(-12, head_top, 12, 26),
    )


def place_figures(
    count: int,
    size: tuple[int, int],
    rng: random.Random,
    min_height_ratio: float = 0.55,
    max_height_ratio: float = 0.92,
) -> list[FigurePlacement]:
    """Place `count` figures side by side, with gaps, fully inside a `size` picture.

    Figures are as tall as `min_height_ratio`..`max_height_ratio` of the picture, less
    when the picture is too narrow for all of them; heights differ by up to 10%.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    width, height = size
    margin = max(2, round(0.02 * min(width, height)))
    scales = [rng.uniform(0.9, 1.0) for _ in range(count)]
    # Gaps between figures are at least 5% of the tallest figure, so figures never touch.
    min_gap_ratio = 0.05
    # Two pixels per figure absorb the rounding of widths and gaps.
    usable_width = width - 2 * margin - 2 * count
    fit_height = usable_width / (sum(scales) * FIGURE_WIDTH_RATIO + (count - 1) * min_gap_ratio)
    wanted = rng.uniform(min_height_ratio, max_height_ratio) * height
    tallest = min(wanted, fit_height, height - 2 * margin)
    if tallest < 16:
        raise ValueError(f"a {width}x{height} picture is too small for {count} figure(s)")
    heights = [max(1, int(tallest * scale)) for scale in scales]
    widths = [round(h * FIGURE_WIDTH_RATIO) for h in heights]
    min_gap = max(1, round(min_gap_ratio * tallest))
    slack = width - 2 * margin - sum(widths) - (count - 1) * min_gap
    # Share the free width at random among the outer margins and the gaps.
    cuts = sorted(rng.uniform(0, max(0, slack)) for _ in range(count))
    extras = [b - a for a, b in zip([0.0, *cuts[:-1]], cuts, strict=True)]
    placements = []
    x = margin
    for index, (figure_height, figure_width) in enumerate(zip(heights, widths, strict=True)):
        x += int(extras[index]) + (min_gap if index else 0)
        top = rng.randint(margin, max(margin, height - margin - figure_height))
        placements.append(FigurePlacement(left=x, top=top, height=figure_height))
        x += figure_width
    return placements


def draw_post(
    figures: Sequence[tuple[DemoCharacter, int]],
    size: tuple[int, int],
    rng: random.Random,
    background: str = "white_background",
) -> DrawnPost:
    """Draw a picture of `figures` (character, outfit index), left to right.

    One figure is a solo picture; several stand side by side without overlapping.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {sorted(BACKGROUNDS)}, got {background!r}")
    if not figures:
        raise ValueError("a post picture needs at least one figure")
    image = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    drawn = []
    for (character, outfit_index), placement in zip(
        figures, place_figures(len(figures), size, rng), strict=True
    ):
        if not 0 <= outfit_index < len(character.outfits):
            raise ValueError(
                f"{character.key} has {len(character.outfits)} outfit(s); "
                f"outfit index {outfit_index} does not exist"
            )
        drawn.append(draw_figure(draw, character, character.outfits[outfit_index], placement))
    return DrawnPost(image=image, figures=tuple(drawn))


def draw_post_image(
    figures: Sequence[tuple[DemoCharacter, int]],
    size: tuple[int, int],
    rng: random.Random,
    background: str = "white_background",
) -> Image.Image:
    """The RGB picture of `draw_post`, without the figure boxes."""
    return draw_post(figures, size, rng, background).image


def draw_ashtray(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A still life for posts with no humans: a round ashtray on a white background.

    Drawn in palette brown so that the picture stays within the world's colours.
    """
    width, height = size
    image = Image.new("RGB", size, BACKGROUNDS["white_background"])
    radius = rng.uniform(0.2, 0.35) * min(width, height)
    centre_x = rng.uniform(radius, width - radius)
    centre_y = rng.uniform(radius, height - radius)
    draw = ImageDraw.Draw(image)
    brown = GARMENT_COLOURS["brown_coat"]
    draw.ellipse(
        (centre_x - radius, centre_y - radius * 0.5, centre_x + radius, centre_y + radius * 0.5),
        fill=brown,
    )
    draw.ellipse(
        (
            centre_x - radius * 0.7,
            centre_y - radius * 0.32,
            centre_x + radius * 0.7,
            centre_y + radius * 0.32,
        ),
        fill=BACKGROUNDS["white_background"],
    )
    return image
