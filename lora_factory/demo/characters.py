"""The synthetic characters that the demo booru serves.

Two of them share the name "Ash" in different franchises, so tag matching has to tell
`ash_(ember_knights)` from `ash_(pocket_tamers)`; Lumi's booru tag has no franchise
suffix, as many real tags don't.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoCharacter:
    key: str
    display_name: str
    franchise: str
    booru_tag: str
    gender: str  # "female" | "male"
    hair: str  # a HAIR_COLOURS tag
    eyes: str  # an EYE_COLOURS tag
    features: tuple[str, ...]  # FEATURE_COLOURS tags
    # Each outfit is a tuple of GARMENT_COLOURS tags: (top, bottom) or (dress,).
    outfits: tuple[tuple[str, ...], ...]
    hair_length: str  # "long" | "short"
    posts: int  # how many posts the booru has for the character's tag


DEMO_CHARACTERS: tuple[DemoCharacter, ...] = (
    DemoCharacter(
        key="ash_ember_knights",
        display_name="Ash",
        franchise="ember_knights",
        booru_tag="ash_(ember_knights)",
        gender="female",
        hair="red_hair",
        eyes="yellow_eyes",
        features=("horns",),
        outfits=(("navy_jacket", "beige_skirt"), ("green_dress",)),
        hair_length="long",
        posts=34,
    ),
    DemoCharacter(
        key="ash_pocket_tamers",
        display_name="Ash",
        franchise="pocket_tamers",
        booru_tag="ash_(pocket_tamers)",
        gender="male",
        hair="black_hair",
        eyes="brown_eyes",
        features=(),
        outfits=(("blue_shirt", "black_pants"),),
        hair_length="short",
        posts=30,
    ),
    DemoCharacter(
        key="lumi_starlight_academy",
        display_name="Lumi",
        franchise="starlight_academy",
        booru_tag="lumi",
        gender="female",
        hair="silver_hair",
        eyes="blue_eyes",
        features=("hair_ribbon",),
        outfits=(("orange_shirt", "purple_skirt"), ("brown_coat", "beige_skirt")),
        hair_length="long",
        posts=32,
    ),
    DemoCharacter(
        key="kaede_starlight_academy",
        display_name="Kaede",
        franchise="starlight_academy",
        booru_tag="kaede_(starlight_academy)",
        gender="female",
        hair="green_hair",
        eyes="purple_eyes",
        features=(),
        outfits=(("orange_shirt", "beige_skirt"),),
        hair_length="short",
        posts=30,
    ),
)
