"""A generic population of demo-world figures with booru captions: a base model's training set.

The demo base model (`lora_factory.demo.base_model_build`) has to know what the demo world's
words look like (`red hair`, `horns`, `navy jacket`, `upper body`) before a LoRA can
teach it one character. It learns them from this population: figures drawn by the demo
booru's own drawing code (`drawing.figure_shapes` / `draw_post`), each with a random
hair, eye and outfit combination, optional horns and hair ribbon, a random pose, a
framing (full body, upper body or portrait) and a plain background, captioned with the
same tags the booru and the factory's captions use (`1girl, solo, long hair, red hair,
blue eyes, horns, ...`). No figure has the hair + eyes + features of one of the index's
characters: the base model must learn the words, never the characters themselves.

Everything is deterministic: figure `index` of population `seed` is always the same
picture and caption (each figure has its own random stream), so a training set and a
held-out set are two seeds, and any figure can be redrawn on its own.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

from lora_factory.bucketing.buckets import KohyaBuckets, resize_and_crop
from lora_factory.demo.booru import UNRELATED_CHARACTERS
from lora_factory.demo.booru import _figure_tags as booru_figure_tags  # the booru's own tag rules
from lora_factory.demo.booru import _people_tags as booru_people_tags
from lora_factory.demo.characters import DEMO_CHARACTERS, DemoCharacter
from lora_factory.demo.drawing import Box, DrawnFigure, draw_post
from lora_factory.demo.palette import BACKGROUNDS, EYE_COLOURS, GARMENT_COLOURS, HAIR_COLOURS

FRAMINGS = ("full_body", "upper_body", "portrait")
FRAMING_WEIGHTS = (4, 3, 3)
BACKGROUND_WEIGHTS = {"white_background": 3, "blue_background": 1}
FEATURE_CHANCES = {"horns": 0.3, "hair_ribbon": 0.25}
DRESS_CHANCE = 0.25
DEFAULT_SIZE = 128  # the demo base model's native resolution

# The demo base model's UNet halves its latents twice (SD1.5's three times), so its
# pictures' sides go in steps of 8 x 4 = 32 px; these are the buckets the factory makes
# for it with its default settings (128 px, sides 64-256 px).
BUCKET_STEP = 32
FACTORY_BUCKETS = KohyaBuckets.around(DEFAULT_SIZE, BUCKET_STEP)
# The demo base model's last stage trains on noise with coarse random structure (kohya's
# noise offset and multi-resolution noise, `training.noise`), and so do its LoRAs: SD1.5's
# schedule leaves a 16x16 latent's coarse structure readable through the noise of the last
# timesteps (from 7% of a picture the model redraws its exact layout), so a model trained
# on plain noise reads colours from its input, and at sampling, which starts from pure
# noise, from the noise's random coarse structure.
COARSE_NOISE_OFFSET = 0.1
COARSE_NOISE_MULTIRES_ITERATIONS = 4  # 16x16 latents: levels of 8, 4, 2 and 1 latent pixels
COARSE_NOISE_MULTIRES_DISCOUNT = 0.5

# The drawing canvas per framing: crops are cut from a picture big enough that they are
# always downscaled (never blown up) to the output size, as the factory's crops are.
_CANVAS = {"full_body": 2, "upper_body": 3, "portrait": 4}  # x the output size
# A portrait shows the head and the top of the shoulders: the head box plus this share
# of its height below it.
_PORTRAIT_SHOULDERS = 0.35
_CROP_MARGIN = 0.08  # background around a crop's content, as a share of the crop

# The world's garments by the part of the outfit they are (see `drawing._check_outfit`).
_NOUNS = {garment: garment.rsplit("_", 1)[-1] for garment in GARMENT_COLOURS}
DRESSES = tuple(g for g, noun in _NOUNS.items() if noun == "dress")
BOTTOMS = tuple(g for g, noun in _NOUNS.items() if noun in ("skirt", "pants"))
TOPS = tuple(g for g in GARMENT_COLOURS if g not in DRESSES + BOTTOMS)


@dataclass(frozen=True)
class PopulationFigure:
    """One captioned picture of the population."""

    image: Image.Image  # RGB, size x size (or its bucket's size)
    tags: tuple[str, ...]  # booru form (`red_hair`), in caption order
    character: DemoCharacter  # the generated look (not an index character)
    framing: str  # one of FRAMINGS
    background: str  # a BACKGROUNDS key

    @property
    def caption(self) -> str:
        """The tags the way captions are written for training: `1girl, solo, red hair, ...`."""
        return caption_text(self.tags)


def caption_text(tags: Sequence[str]) -> str:
    return ", ".join(tag.replace("_", " ") for tag in tags)


def _identity(character: DemoCharacter) -> tuple[str, str, frozenset[str]]:
    """What makes a character recognisable in the demo world: hair, eyes and features."""
    return character.hair, character.eyes, frozenset(character.features)


# The index's characters, and the booru's other named characters: never generated.
RESERVED_IDENTITIES = frozenset(_identity(c) for c in DEMO_CHARACTERS + UNRELATED_CHARACTERS)


def random_character(rng: random.Random, key: str = "population") -> DemoCharacter:
    """A random look made of the world's colours, never a named character's identity."""
    while True:
        features = tuple(feature for feature, chance in FEATURE_CHANCES.items() if rng.random() < chance)
        if rng.random() < DRESS_CHANCE:
            outfit: tuple[str, ...] = (rng.choice(DRESSES),)
        else:
            outfit = (rng.choice(TOPS), rng.choice(BOTTOMS))
        character = DemoCharacter(
            key=key,
            display_name=key,
            franchise="",
            booru_tag="",
            # The demo world's dress code, which the tagger reads: trousers make a boy.
            gender="male" if outfit[-1].endswith("pants") else "female",
            hair=rng.choice(sorted(HAIR_COLOURS)),
            eyes=rng.choice(sorted(EYE_COLOURS)),
            features=features,
            outfits=(outfit,),
            hair_length=rng.choice(("long", "short")),
            posts=0,
        )
        if _identity(character) not in RESERVED_IDENTITIES:
            return character


def population_figure(
    seed: int, index: int, size: int = DEFAULT_SIZE, buckets: KohyaBuckets | None = None
) -> PopulationFigure:
    """Figure `index` of the population drawn from `seed`: the same picture every time.

    A square `size` picture; with `buckets`, the same figure cut the way the factory cuts
    its crops (a box around what the framing shows, at the box's own aspect ratio) and
    fitted to its kohya bucket the way the factory's training set is (`size` unused).
    """
    # A string seed is hashed with sha512 by `random`: stable across runs and machines.
    rng = random.Random(f"demo-population:{seed}:{index}")
    character = random_character(rng, key=f"population_{seed}_{index}")
    framing = rng.choices(FRAMINGS, weights=FRAMING_WEIGHTS)[0]
    background = rng.choices(list(BACKGROUND_WEIGHTS), weights=list(BACKGROUND_WEIGHTS.values()))[0]
    side = size if buckets is None else max(buckets.resolution)
    canvas = side * _CANVAS[framing]
    drawn = draw_post([(character, 0)], (canvas, canvas), rng, background)
    (figure,) = drawn.figures
    if buckets is None:
        image = _frame(drawn.image, figure, framing, BACKGROUNDS[background])
        image = image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=None)
    else:
        crop = _crop(drawn.image, _framing_box(figure, framing), BACKGROUNDS[background], square=False)
        choice = buckets.select(crop.width, crop.height)
        image = resize_and_crop(crop, choice.bucket, choice.resized)
    return PopulationFigure(
        image=image,
        tags=tuple(figure_tags(character, framing, background)),
        character=character,
        framing=framing,
        background=background,
    )


def generate_population(seed: int, count: int, size: int = DEFAULT_SIZE, start: int = 0) -> Iterator[PopulationFigure]:
    """Figures `start` .. `start + count - 1` of the population drawn from `seed`."""
    for index in range(start, start + count):
        yield population_figure(seed, index, size)


def figure_tags(character: DemoCharacter, framing: str, background: str) -> list[str]:
    """The booru's tags for a solo figure (see `DemoBooru._draw`), framed as the crop is.

    A portrait shows the top of the outfit only, so the bottom garment's tags are left
    out; a full-body figure is `standing`, as the booru tags its posts.
    """
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    outfit = character.outfits[0]
    if framing == "portrait":
        outfit = outfit[:1]
    tags = booru_people_tags([character])
    tags += booru_figure_tags(character, outfit, in_colour=True)
    tags.append(framing)
    if framing == "full_body":
        tags.append("standing")
    tags += ["looking_at_viewer", background, "simple_background"]
    return tags


def _frame(image: Image.Image, figure: DrawnFigure, framing: str, background: tuple[int, int, int]) -> Image.Image:
    """The square part of the picture that `framing` shows of the figure."""
    if framing == "full_body":
        return image  # draw_post already placed the whole figure in the square picture
    return _crop(image, _framing_box(figure, framing), background, square=True)


def _framing_box(figure: DrawnFigure, framing: str) -> Box:
    """The part of the figure that `framing` shows."""
    if framing == "full_body":
        return figure.box
    if framing == "upper_body":
        return figure.half_body_box
    left, top, right, bottom = figure.head_box
    return left, top, right, bottom + round(_PORTRAIT_SHOULDERS * (bottom - top))


def _crop(image: Image.Image, box: Box, background: tuple[int, int, int], square: bool) -> Image.Image:
    """`box` with a margin (a square around it if `square`); what falls outside the
    picture is background."""
    left, top, right, bottom = box
    width = round((right - left) / (1 - 2 * _CROP_MARGIN))
    height = round((bottom - top) / (1 - 2 * _CROP_MARGIN))
    if square:
        width = height = max(width, height)
    # Centred on the box across; the box's top stays near the crop's top, as in a real crop.
    crop_left = (left + right - width) // 2
    crop_top = top - round(_CROP_MARGIN * height)
    crop = Image.new("RGB", (width, height), background)
    crop.paste(image.crop((crop_left, crop_top, crop_left + width, crop_top + height)), (0, 0))
    # PIL fills the parts of a crop outside the picture with black: paint them over.
    outside = Image.new("L", (width, height), 255)
    inside_left, inside_top = max(0, -crop_left), max(0, -crop_top)
    inside_right, inside_bottom = min(width, image.width - crop_left), min(height, image.height - crop_top)
    outside.paste(0, (inside_left, inside_top, inside_right, inside_bottom))
    crop.paste(background, (0, 0, width, height), outside)
    return crop
