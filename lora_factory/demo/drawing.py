"""Draws the demo world's characters: simple standing figures in flat palette colours.

Every shape is drawn without antialiasing and only in `palette` colours (+ SKIN and the
plain backgrounds), so a freshly drawn image holds nothing but tag colours, and the
built-in tiny vision models can read hair, eyes, features and garments from it.
Proportions are those of one standing figure (the head about a fifth of the height,
the hips at 58%), varied per figure by a `FigurePose` (see `poses`: without it every
figure of an outfit would be a near duplicate of every other). The truth boxes of a
drawn figure are measured on what was drawn, so they stay exact whatever the pose.
Everything random comes from the caller's `random.Random`, so a seed gives the same
pictures every time.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

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
from lora_factory.demo.poses import (
    ARM_WIDTH,
    LEG_BOTTOM,
    LEG_TOP,
    FigurePose,
    Point,
    random_pose,
)

# A figure is laid out on a 100-unit tall grid whose x origin is the figure's centre.
FIGURE_UNITS = 100.0
SHOULDER_LINE = 26.0  # where the torso starts: the head box is everything above it
# The upper body (head to hips) is what a half-body crop of this figure holds.
HALF_BODY_BOTTOM = 58.0

Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive)
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class FigurePlacement:
    """Where a figure goes: its box's top-left corner and its size in pixels."""

    left: int
    top: int
    height: int
    width: int


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


@dataclass(frozen=True)
class _Shape:
    kind: str  # "polygon", "rectangle", "ellipse" or "chord" (an ellipse's upper half)
    points: tuple[Point, ...]  # a polygon's corners, or two corners of the shape's box
    colour: Colour


class FigureShapes:
    """A figure's shapes in figure units (see `figure_shapes`), back to front.

    `scaled(f)` gives a view that adds its shapes to the same list with every
    coordinate multiplied by f: the head is drawn once and scaled from the figure's top.
    """

    def __init__(self, scale: float = 1.0, items: list[_Shape] | None = None) -> None:
        self.scale = scale
        self.items: list[_Shape] = [] if items is None else items

    def scaled(self, factor: float) -> FigureShapes:
        return FigureShapes(self.scale * factor, self.items)

    def _add(self, kind: str, points: Sequence[Point], colour: Colour) -> None:
        self.items.append(_Shape(kind, tuple((x * self.scale, y * self.scale) for x, y in points), colour))

    def polygon(self, points: Sequence[Point], colour: Colour) -> None:
        self._add("polygon", points, colour)

    def mirrored_polygon(self, points: Sequence[Point], colour: Colour) -> None:
        """A left-side shape and its mirror image on the right side."""
        self.polygon(points, colour)
        self.polygon([(-x, y) for x, y in points], colour)

    def rectangle(self, x0: float, y0: float, x1: float, y1: float, colour: Colour) -> None:
        self._add("rectangle", [(x0, y0), (x1, y1)], colour)

    def ellipse(self, x0: float, y0: float, x1: float, y1: float, colour: Colour) -> None:
        self._add("ellipse", [(x0, y0), (x1, y1)], colour)

    def chord(self, x0: float, y0: float, x1: float, y1: float, colour: Colour) -> None:
        self._add("chord", [(x0, y0), (x1, y1)], colour)

    def thick_line(self, points: Sequence[Point], width: float, colour: Colour) -> None:
        """A polyline `width` thick: a quad per segment and a disc at each bend."""
        half = width / 2
        for (x0, y0), (x1, y1) in pairwise(points):
            length = math.hypot(x1 - x0, y1 - y0)
            across_x, across_y = (y1 - y0) / length * half, -(x1 - x0) / length * half
            self.polygon(
                [(x0 + across_x, y0 + across_y), (x0 - across_x, y0 - across_y),
                 (x1 - across_x, y1 - across_y), (x1 + across_x, y1 + across_y)],
                colour,
            )  # fmt: skip
        for x, y in points[1:-1]:
            self.ellipse(x - half, y - half, x + half, y + half, colour)

    def reach(self) -> tuple[float, float]:
        """How far the shapes reach left and right of the centre line."""
        xs = [x for shape in self.items for x, _ in shape.points]
        return -min(xs), max(xs)


def _check_outfit(outfit: tuple[str, ...]) -> None:
    unknown = [garment for garment in outfit if garment not in GARMENT_COLOURS]
    if unknown or len(outfit) not in (1, 2):
        raise ValueError(
            f"outfit {outfit!r} must be (top, bottom) or (dress,) made of palette garments; "
            f"unknown garments: {unknown}"
        )


def _is_trousers(garment: str) -> bool:
    return garment.endswith("pants")


def figure_shapes(character: DemoCharacter, outfit: tuple[str, ...], pose: FigurePose) -> FigureShapes:
    """The shapes of one standing figure of `character` wearing `outfit` in `pose`."""
    _check_outfit(outfit)
    shapes = FigureShapes()
    hair = HAIR_COLOURS[character.hair]
    long_hair = character.hair_length == "long"
    # Back to front: hair, arms behind the back, legs, garments, arms, head.
    sleeves = GARMENT_COLOURS[outfit[0]]
    if long_hair:
        _hair_behind(shapes, pose, hair)
    _arms(shapes, pose, sleeves, behind=True)
    _legs(shapes, pose)
    _garments(shapes, outfit, pose)
    _arms(shapes, pose, sleeves, behind=False)
    shapes.rectangle(-2.5, 21, 2.5, 27, SKIN)  # the neck
    _head(shapes, character, pose)
    return shapes


def _hair_behind(shapes: FigureShapes, pose: FigurePose, hair: Colour) -> None:
    scale = pose.head_scale
    shapes.scaled(scale).ellipse(-11.5, 2.5, 11.5, 26, hair)
    top, half_width = 14 * scale, 11.5 * scale
    shapes.polygon([(-half_width, top), (half_width, top), (16, pose.hair_end), (-16, pose.hair_end)], hair)


def _legs(shapes: FigureShapes, pose: FigurePose) -> None:
    for side in (-1, 1):
        shift = pose.foot_shift(side)
        shapes.polygon(
            [(side * 2.5, LEG_TOP), (side * 7, LEG_TOP),
             (side * 7 + shift, LEG_BOTTOM), (side * 2.5 + shift, LEG_BOTTOM)],
            SKIN,
        )  # fmt: skip
        shapes.ellipse(side * 1.5 + shift, 94.5, side * 8 + shift, 99, SKIN)


def _garments(shapes: FigureShapes, outfit: tuple[str, ...], pose: FigurePose) -> None:
    top_colour = GARMENT_COLOURS[outfit[0]]
    width = pose.body_width
    hem_width = pose.hem_flare * width
    if len(outfit) == 1:  # a dress from the shoulders to about the knees
        hem = 45 + 29 * pose.hem_length
        shapes.polygon(
            [(-10 * width, SHOULDER_LINE), (10 * width, SHOULDER_LINE), (10 * width, 45),
             (15 * hem_width, hem), (-15 * hem_width, hem), (-10 * width, 45)],
            top_colour,
        )  # fmt: skip
        return
    bottom_colour = GARMENT_COLOURS[outfit[1]]
    if _is_trousers(outfit[1]):
        shapes.rectangle(-10 * width, 53, 10 * width, 62, bottom_colour)
        end = pose.trouser_end
        for side in (-1, 1):
            # The trouser leg follows the leg: its shift grows from the hip down.
            shift = pose.foot_shift(side) * (end - LEG_TOP) / (LEG_BOTTOM - LEG_TOP)
            shapes.polygon(
                [(side * 10 * width, 53), (side * 0.5, 53), (side * 1 + shift, end), (side * 9 + shift, end)],
                bottom_colour,
            )
    else:
        hem = 53 + 19 * pose.hem_length
        shapes.polygon(
            [(-10 * width, 53), (10 * width, 53), (14 * hem_width, hem), (-14 * hem_width, hem)],
            bottom_colour,
        )
    hem = pose.top_hem
    shapes.polygon(
        [(-11 * width, SHOULDER_LINE), (11 * width, SHOULDER_LINE), (10 * width, hem), (-10 * width, hem)],
        top_colour,
    )


def _arms(shapes: FigureShapes, pose: FigurePose, sleeve_colour: Colour, behind: bool) -> None:
    """The arms that are (`behind`) or are not behind the body."""
    for side in (-1, 1):
        if pose.arms_behind[0 if side < 0 else 1] != behind:
            continue
        arm = pose.arm(side)
        shapes.thick_line(arm, ARM_WIDTH, SKIN)
        shapes.thick_line(_along(arm, pose.sleeve_length), ARM_WIDTH, sleeve_colour)
        if pose.bag_side == side:  # held by its top edge, in the sleeves' colour
            hand_x, hand_y = arm[-1]
            shapes.rectangle(hand_x - 2.5, hand_y - 0.5, hand_x + 2.5, hand_y + 8, sleeve_colour)


def _along(points: Sequence[Point], share: float) -> list[Point]:
    """The start of a polyline, `share` of its length long."""
    lengths = [math.dist(a, b) for a, b in pairwise(points)]
    left = share * sum(lengths)
    kept = [points[0]]
    for (a, b), length in zip(pairwise(points), lengths, strict=True):
        if left >= length:
            kept.append(b)
            left -= length
            continue
        t = left / length
        kept.append((a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t))
        break
    return kept


def _head(shapes: FigureShapes, character: DemoCharacter, pose: FigurePose) -> None:
    head = shapes.scaled(pose.head_scale)
    hair = HAIR_COLOURS[character.hair]
    long_hair = character.hair_length == "long"
    if not long_hair:
        volume = 11 * pose.hair_volume
        head.ellipse(-volume, 2.5, volume, 22, hair)
    head.ellipse(-9, 4, 9, 24, SKIN)  # the face: 1/5 of the figure's height
    head.chord(-10, 2.5, 10, 26, hair)  # bangs: the upper half of an ellipse over the face
    if long_hair:  # locks falling in front of the shoulders
        scale, end = pose.head_scale, pose.hair_end - 8
        shapes.mirrored_polygon([(-10 * scale, 13 * scale), (-7 * scale, 13 * scale), (-8, end), (-11.5, end)], hair)
    else:  # sideburns
        head.mirrored_polygon([(-10, 13), (-7.5, 13), (-8, 20), (-9.5, 20)], hair)
    # Each eye is about 20% of the face wide: it survives downscaling.
    half_width = 1.8 * pose.eye_width
    for side in (-1, 1):
        centre = side * (4 + pose.eye_offset)
        head.ellipse(centre - half_width, 15, centre + half_width, 20, EYE_COLOURS[character.eyes])
    if "horns" in character.features:
        head.mirrored_polygon([(-7.5, 8), (-3.5, 6), (-8.5, 0)], FEATURE_COLOURS["horns"])
    if "hair_ribbon" in character.features:
        ribbon, side = FEATURE_COLOURS["hair_ribbon"], pose.ribbon_side
        head.polygon([(side * 6, 4.5), (side * 2, 1), (side * 2, 8)], ribbon)
        head.polygon([(side * 6, 4.5), (side * 10, 1), (side * 10, 8)], ribbon)
        head.rectangle(side * 5, 3.5, side * 7, 5.5, ribbon)


def width_ratio(shapes: FigureShapes) -> float:
    """How wide a figure made of `shapes` is, relative to its height."""
    return sum(shapes.reach()) / FIGURE_UNITS


def draw_figure(
    image: Image.Image,
    character: DemoCharacter,
    outfit: tuple[str, ...],
    shapes: FigureShapes,
    placement: FigurePlacement,
) -> DrawnFigure:
    """Draw the `shapes` of `character` wearing `outfit` (see `figure_shapes`) at `placement`.

    The figure is drawn on its own transparent layer and pasted, so its boxes are
    measured on exactly the pixels it covers.
    """
    unit = placement.height / FIGURE_UNITS
    centre_x = shapes.reach()[0] * unit
    # One spare pixel each way holds the rounding of the outermost points.
    layer = Image.new("RGBA", (placement.width + 1, placement.height + 1), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    def pixel(point: Point) -> tuple[int, int]:
        return round(centre_x + point[0] * unit), round(point[1] * unit)

    for shape in shapes.items:
        corners = [pixel(point) for point in shape.points]
        if shape.kind == "polygon":
            draw.polygon(corners, fill=shape.colour)
            continue
        (x0, y0), (x1, y1) = corners
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        if shape.kind == "rectangle":
            draw.rectangle(box, fill=shape.colour)
        elif shape.kind == "ellipse":
            draw.ellipse(box, fill=shape.colour)
        else:
            draw.chord(box, 180, 360, fill=shape.colour)
    image.paste(layer, (placement.left, placement.top), layer)

    alpha = layer.getchannel("A")

    def drawn_box(rows: int) -> Box:
        """The box of the figure's pixels in the layer's top `rows` rows, in picture pixels."""
        left, top, right, bottom = alpha.crop((0, 0, alpha.width, rows)).getbbox()
        return left + placement.left, top + placement.top, right + placement.left, bottom + placement.top

    return DrawnFigure(
        character_key=character.key,
        outfit=outfit,
        box=drawn_box(alpha.height),
        half_body_box=drawn_box(round(HALF_BODY_BOTTOM * unit)),
        head_box=drawn_box(round(SHOULDER_LINE * unit)),
    )


def place_figures(
    width_ratios: Sequence[float],
    size: tuple[int, int],
    rng: random.Random,
    min_height_ratio: float = 0.55,
    max_height_ratio: float = 0.92,
) -> list[FigurePlacement]:
    """Place figures (width / height as given) side by side, with gaps, inside a picture.

    Figures are as tall as `min_height_ratio`..`max_height_ratio` of the picture, less
    when the picture is too narrow for all of them; heights differ by up to 10%.
    """
    count = len(width_ratios)
    if count < 1:
        raise ValueError("place_figures needs at least one figure's width ratio")
    width, height = size
    margin = max(2, round(0.02 * min(width, height)))
    scales = [rng.uniform(0.9, 1.0) for _ in range(count)]
    # Gaps between figures are at least 5% of the tallest figure, so figures never touch.
    min_gap_ratio = 0.05
    # Two pixels per figure absorb the rounding of widths and gaps.
    usable_width = width - 2 * margin - 2 * count
    scaled_widths = sum(s * r for s, r in zip(scales, width_ratios, strict=True))
    fit_height = usable_width / (scaled_widths + (count - 1) * min_gap_ratio)
    wanted = rng.uniform(min_height_ratio, max_height_ratio) * height
    tallest = min(wanted, fit_height, height - 2 * margin)
    if tallest < 16:
        raise ValueError(f"a {width}x{height} picture is too small for {count} figure(s)")
    heights = [max(1, int(tallest * scale)) for scale in scales]
    widths = [round(h * r) for h, r in zip(heights, width_ratios, strict=True)]
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
        placements.append(FigurePlacement(left=x, top=top, height=figure_height, width=figure_width))
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
    Every figure gets its own random pose.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {sorted(BACKGROUNDS)}, got {background!r}")
    if not figures:
        raise ValueError("a post picture needs at least one figure")
    for character, outfit_index in figures:
        if not 0 <= outfit_index < len(character.outfits):
            raise ValueError(
                f"{character.key} has {len(character.outfits)} outfit(s); "
                f"outfit index {outfit_index} does not exist"
            )
    outfits = [character.outfits[outfit_index] for character, outfit_index in figures]
    shapes = [
        figure_shapes(character, outfit, random_pose(rng))
        for (character, _), outfit in zip(figures, outfits, strict=True)
    ]
    placements = place_figures([width_ratio(figure) for figure in shapes], size, rng)
    image = Image.new("RGB", size, BACKGROUNDS[background])
    drawn = [
        draw_figure(image, character, outfit, figure, placement)
        for (character, _), outfit, figure, placement in zip(figures, outfits, shapes, placements, strict=True)
    ]
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
